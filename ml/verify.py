"""Whether a query photo shows the very product of a catalog image: local features that agree under one view.

Two images of one product share many small details (corners, print, edges) that one perspective carries from
one image onto the other; two products that only look alike share few such details in a consistent layout.
This is the geometric verification of instance retrieval: SIFT keypoints (OpenCV), Lowe's ratio test, and a
robust homography (MAGSAC). Its inliers count the details that agree. A homography that mirrors the image,
turns it further than a hand-held photo would, or squashes it is no view of the same product (a "b" is a
turned "q", a "<" a turned ">", a product and its mirror-image variant are two products), so it counts nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

WORKING_SIDE = 512  # both images are compared at this longer side (small catalog images are enlarged)
MAX_KEYPOINTS = 2000
RATIO = 0.8  # Lowe's ratio test: a match must be clearly better than the second best
REPROJECTION_PX = 6.0  # at the working side
MAX_TURN_DEGREES = 60.0  # a shopper's photo is turned and tilted, never upside down
MAX_STRETCH = 3.0  # ratio of the view's two scales: beyond it, a degenerate fit
MIN_MATCHES = 5


@dataclass(frozen=True)
class Keypoints:
    points: np.ndarray  # float32 [n, 2], at the working side
    descriptors: np.ndarray  # float32 [n, 128]


def keypoints(image: Image.Image) -> Keypoints:
    """An image's local features, at the working side."""
    import cv2  # on first use: OpenCV is only needed once a result is checked

    gray = image.convert("L")
    scale = WORKING_SIDE / max(gray.size)
    gray = gray.resize((max(8, round(gray.width * scale)), max(8, round(gray.height * scale))),
                       Image.Resampling.BICUBIC)
    found, descriptors = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS).detectAndCompute(np.asarray(gray), None)
    if descriptors is None:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    return Keypoints(np.float32([point.pt for point in found]).reshape(-1, 2), descriptors.astype(np.float32))


def agreeing_points(query: Keypoints, match: Keypoints) -> int:
    """How many of the query's local features one plausible view carries onto the match's; 0 when none does."""
    import cv2

    if len(query.descriptors) < 2 or len(match.descriptors) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(query.descriptors, match.descriptors, k=2)
    good = [best for best, second in (pair for pair in pairs if len(pair) == 2)
            if best.distance < RATIO * second.distance]
    if len(good) < MIN_MATCHES:
        return 0
    source = query.points[[m.queryIdx for m in good]]
    target = match.points[[m.trainIdx for m in good]]
    view, inliers = cv2.findHomography(source, target, cv2.USAC_MAGSAC, REPROJECTION_PX)
    if view is None or inliers is None or not plausible_view(view):
        return 0
    return int(inliers.sum())


def plausible_view(view: np.ndarray) -> bool:
    """Whether a homography is a view a phone could take of the product: not mirrored, not upside down, not squashed."""
    if abs(view[2, 2]) < 1e-12:
        return False
    linear = view[:2, :2] / view[2, 2]
    if np.linalg.det(linear) <= 0:
        return False
    turn = np.degrees(np.arctan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    scales = np.linalg.svd(linear, compute_uv=False)
    return abs(turn) < MAX_TURN_DEGREES and scales[0] / max(scales[1], 1e-12) < MAX_STRETCH
