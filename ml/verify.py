"""Whether a query photo shows the very product of a catalog image: local features that agree under one view.

Two images of one product share many small details (corners, print, edges) that one perspective carries from
one image onto the other; two products that only look alike share few such details in a consistent layout.
This is the geometric verification of instance retrieval: SIFT keypoints (OpenCV), Lowe's ratio test, and a
robust homography (MAGSAC). Its inliers count the details that agree. A homography that mirrors the image,
turns it further than a hand-held photo would, or squashes it is no view of the same product (a "b" is a
turned "q", a "<" a turned ">", a product and its mirror-image variant are two products), so it counts nothing.

Flat artwork (a letter, a digit, a flag, a small blurred stamp) has too few such details. For it, the second
check aligns the catalog image's product onto the photo and compares their colours: a coarse search over
the scales and turns a phone photo could show it at (OpenCV's masked template matching), refined to a
homography by ECC (enhanced correlation coefficient maximisation, Evangelidis and Psarakis), whose final
coefficient says how well the whole product agrees, pixel by pixel, under one plausible view.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ml.localize import on_plain_background

WORKING_SIDE = 512  # both images are compared at this longer side (small catalog images are enlarged)
MAX_KEYPOINTS = 2000
RATIO = 0.8  # Lowe's ratio test: a match must be clearly better than the second best
REPROJECTION_PX = 6.0  # at the working side
MAX_TURN_DEGREES = 60.0  # a shopper's photo is turned and tilted, never upside down
MAX_STRETCH = 3.0  # ratio of the view's two scales: beyond it, a degenerate fit
MIN_MATCHES = 5
ALIGN_SIDE = 128  # the photo's longer side for the alignment; the product is searched at 30-100 % of it
ALIGN_SCALES = tuple(np.geomspace(0.3, 1.0, 6).tolist())  # the product's longer side, as a share of the photo's
ALIGN_TURNS = (-30.0, -15.0, 0.0, 15.0, 30.0)  # degrees: ECC refines between them
ALIGN_REFINED = 3  # the best placements refined by ECC
ALIGN_BLUR = 1.0  # both images are smoothed a little: a phone photo's noise and JPEG blocks do not count
MASK_SIDE = 4 * ALIGN_SIDE  # the catalog image's product is found at most this large
ALIGN_MIN_PIXELS = 200  # a placed product covering fewer pixels agrees with too much by chance
ALIGN_MAX_DRIFT = 0.25  # ECC may move the product's corners this share of its diagonal from the placement


@dataclass(frozen=True)
class Keypoints:
    points: np.ndarray  # float32 [n, 2], at the working side
    descriptors: np.ndarray  # float32 [n, 128]


def keypoints(image: Image.Image) -> Keypoints:
    """An image's local features, at the working side."""
    import cv2  # on first use: OpenCV is only needed once a result is checked

    gray = image.convert("L")
    gray = gray.resize(_fitted((gray.height, gray.width), WORKING_SIDE), Image.Resampling.BICUBIC)
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


@dataclass(frozen=True)
class Template:
    """A catalog image's product for the alignment: its pixels and where the product is."""

    pixels: np.ndarray  # uint8 [h, w, 3], the product's bounding box, longer side ALIGN_SIDE
    mask: np.ndarray  # uint8 [h, w], 255 on the product


def template(image: Image.Image) -> Template | None:
    """The product of a catalog image: what stands out from a product shot's plain background
    (``ml.localize``), or the whole image on a busy one; None for an image of one colour all over."""
    import cv2

    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if max(pixels.shape[:2]) > MASK_SIDE:  # a large master: its mask at full size would cost gigabytes
        pixels = cv2.resize(pixels, _fitted(pixels.shape, MASK_SIDE), interpolation=cv2.INTER_AREA)
    product = on_plain_background(pixels.astype(np.float32) / 255)
    if product is None:
        product = np.ones(pixels.shape[:2], dtype=bool)
    rows, columns = np.nonzero(product)
    if not rows.size:
        return None
    box = np.s_[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    pixels, product = pixels[box], product[box]
    size = _fitted(pixels.shape, ALIGN_SIDE)
    return Template(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA),
                    cv2.resize(product.astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST))


def aligned_correlation(query: Image.Image, match: Template | None) -> float:
    """How well the match's product, aligned onto the photo under one plausible view, agrees with it: the
    ECC coefficient of their colours over the product, up to 1; -1 when no plausible view aligns them."""
    import cv2

    if match is None:
        return -1.0
    photo = np.asarray(query.convert("RGB"), dtype=np.uint8)
    photo = cv2.GaussianBlur(cv2.resize(photo, _fitted(photo.shape, ALIGN_SIDE), interpolation=cv2.INTER_AREA),
                             (0, 0), ALIGN_BLUR).astype(np.float32)
    placements = []  # (template matching's score, pixels, mask, view onto the photo)
    for scale in ALIGN_SCALES:
        size = _fitted(match.pixels.shape, scale * ALIGN_SIDE, smallest=4)
        pixels = cv2.GaussianBlur(cv2.resize(match.pixels, size, interpolation=cv2.INTER_AREA), (0, 0), ALIGN_BLUR)
        mask = cv2.resize(match.mask, size, interpolation=cv2.INTER_NEAREST)
        for turn in ALIGN_TURNS:
            view, turned_size = _turned(size, turn)
            if turned_size[0] > photo.shape[1] or turned_size[1] > photo.shape[0]:
                continue
            turned_mask = cv2.warpAffine(mask, view[:2], turned_size, flags=cv2.INTER_NEAREST, borderValue=0)
            if np.count_nonzero(turned_mask) < ALIGN_MIN_PIXELS:
                continue
            turned = cv2.warpAffine(pixels, view[:2], turned_size, flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))
            scores = cv2.matchTemplate(photo, turned.astype(np.float32), cv2.TM_CCOEFF_NORMED, mask=turned_mask)
            # Over flat parts of the photo masked matching can return anything, inf and NaN included.
            scores = np.where(np.isfinite(scores) & (np.abs(scores) <= 1.0 + 1e-3), scores, -1.0)
            y, x = np.unravel_index(int(np.argmax(scores)), scores.shape)
            placed = view.copy()
            placed[:2, 2] += (x, y)
            placements.append((float(scores[y, x]), pixels, mask, placed))
    placements.sort(key=lambda placement: -placement[0])
    everywhere = np.full(photo.shape[:2], 255, dtype=np.uint8)
    best = -1.0
    for _, pixels, mask, view in placements[:ALIGN_REFINED]:
        try:
            coefficient, refined = cv2.findTransformECCWithMask(
                pixels.astype(np.float32), photo, mask, everywhere, view.astype(np.float32), cv2.MOTION_HOMOGRAPHY,
                (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-4), 1)
        except cv2.error:  # ECC did not converge from this placement
            continue
        refined = refined.astype(np.float64)
        if (np.isfinite(refined).all() and plausible_view(refined)
                and _drift(view, refined, pixels.shape) <= ALIGN_MAX_DRIFT
                and _shown(mask, refined, photo.shape) >= ALIGN_MIN_PIXELS):
            best = max(best, float(coefficient))
    return best


def _shown(mask: np.ndarray, view: np.ndarray, shape: tuple[int, ...]) -> int:
    """How many of the product's pixels a view puts inside the photo (one pushed off it, or shrunk to a sliver,
    agrees by chance)."""
    import cv2

    return int(np.count_nonzero(cv2.warpPerspective(mask, view, (shape[1], shape[0]), flags=cv2.INTER_NEAREST,
                                                    borderValue=0)))


def _drift(placed: np.ndarray, refined: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far a refined view moves the product's corners from where it was placed, as a share of its diagonal
    (ECC that wanders off has found some other thing to agree with)."""
    height, width = shape[:2]
    corners = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64).T

    def projected(view: np.ndarray) -> np.ndarray:
        points = view.astype(np.float64) @ corners
        return points[:2] / points[2]

    return float(np.linalg.norm(projected(placed) - projected(refined), axis=0).max() / np.hypot(width, height))


def _fitted(shape: tuple[int, ...], side: float, *, smallest: int = 8) -> tuple[int, int]:
    """(width, height) of an image of ``shape`` scaled to a longer side of ``side``."""
    scale = side / max(shape[:2])
    return max(smallest, round(shape[1] * scale)), max(smallest, round(shape[0] * scale))


def _turned(size: tuple[int, int], degrees: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The 3x3 view that turns an image of ``size`` by ``degrees`` about its centre into a canvas that holds
    it all, and that canvas's (width, height)."""
    import cv2

    width, height = size
    view = np.eye(3)
    view[:2] = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    cos, sin = abs(view[0, 0]), abs(view[0, 1])
    canvas = int(height * sin + width * cos), int(height * cos + width * sin)
    view[0, 2] += canvas[0] / 2 - width / 2
    view[1, 2] += canvas[1] / 2 - height / 2
    return view, canvas
