"""Where in a photo the objects are, and which regions of two images agree: from the backbone's own features.

Without a detector's weights: on a product shot's plain background the objects are what stands out from
it, and elsewhere the classifier's spatial feature maps localise them (class activation mapping in its
class-agnostic form: the channels' summed activation is high on objects). The same maps, compared cell by
cell, show which regions of a query and a catalog image agree.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ml.preprocessing import EvalPreset

OBJECT_THRESHOLD = 0.45  # share of the photo's strongest activation that counts as object
_WORK_SIDE = 160  # objects are found on the photo shrunk to this
_PLAIN_BORDER = 0.08  # a border whose colours stray less than this from their median is one plain colour
_STANDS_OUT = 0.12  # a pixel this far from a plain background's colour is object
MIN_OBJECT_AREA = 0.02  # of the photo: smaller blobs are texture, not objects
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Box:
    x0: float  # fractions of the image's width and height
    y0: float
    x1: float
    y1: float
    score: float

    def as_list(self) -> list[float]:
        return [round(v, 4) for v in (self.x0, self.y0, self.x1, self.y1)]


def content_box(preset: EvalPreset, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the image lies in the model's input square (left, top, width, height, in input pixels); a
    centre crop's box reaches past the square where the image was cut off."""
    width, height = size
    side = preset.crop_size
    if preset.mode == "center_crop":
        scale = preset.resize_size / min(width, height)
    else:
        scale = side / max(width, height)
    shown_w, shown_h = width * scale, height * scale
    return (side - shown_w) / 2, (side - shown_h) / 2, shown_w, shown_h


def to_image(cells: np.ndarray, preset: EvalPreset, size: tuple[int, int], *, out: tuple[int, int]) -> np.ndarray:
    """A cell map of the input square, resampled over the image itself at ``out`` (width, height) pixels."""
    side = preset.crop_size
    canvas = np.asarray(Image.fromarray(cells.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR))
    left, top, width, height = content_box(preset, size)
    columns = np.clip(left + (np.arange(out[0]) + 0.5) * width / out[0], 0, side - 1).astype(int)
    rows = np.clip(top + (np.arange(out[1]) + 0.5) * height / out[1], 0, side - 1).astype(int)
    return canvas[np.ix_(rows, columns)]


def activation(maps: np.ndarray) -> np.ndarray:
    """The class-agnostic activation of each cell [h, w], scaled to 0..1."""
    energy = np.maximum(maps, 0).sum(axis=0)
    low, high = float(energy.min()), float(energy.max())
    return (energy - low) / (high - low) if high > low else np.zeros_like(energy)


def on_plain_background(pixels: np.ndarray) -> np.ndarray | None:
    """Where an image ([h, w, 3] floats in 0-1) stands out from its border's colour when that border is one
    plain colour (a product shot), as a boolean mask; None on a busy background."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    if np.abs(border - background).max(axis=1).mean() >= _PLAIN_BORDER:
        return None
    return np.abs(pixels - background).max(axis=2) > _STANDS_OUT


def object_boxes(image: Image.Image, maps: np.ndarray, preset: EvalPreset, *, max_objects: int = MAX_OBJECTS) -> list[Box]:
    """The distinct objects of a photo, strongest first.

    Where the photo's border is one plain colour (a product shot), the objects are what stands out from
    it; on a busy background, what the features activate on. Either way each blob's score is its mean
    activation, so texture the model ignores ranks last.
    """
    small = image.convert("RGB")
    small.thumbnail((_WORK_SIDE, _WORK_SIDE))
    pixels = np.asarray(small, dtype=np.float32) / 255
    out = (small.width, small.height)
    heat = to_image(activation(maps), preset, image.size, out=out)
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-9)
    mask = on_plain_background(pixels)
    if mask is None:
        mask = heat >= OBJECT_THRESHOLD
    # Closed with a margin around it, so the array is never smaller than the structure: unpadded, scipy's
    # binary_closing corrupted the heap on the corpus's tiny images (test_bad_input.py crashed at random).
    margin = 6
    mask = ndimage.binary_closing(np.pad(mask, margin), structure=np.ones((5, 5)), iterations=2)[margin:-margin,
                                                                                                 margin:-margin]
    labels, _ = ndimage.label(ndimage.binary_fill_holes(mask))
    boxes = []
    for number, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        rows, columns = found
        inside = labels[found] == number
        if inside.sum() < MIN_OBJECT_AREA * out[0] * out[1]:
            continue
        boxes.append(Box(columns.start / out[0], rows.start / out[1], columns.stop / out[0], rows.stop / out[1],
                         float(heat[found][inside].mean())))
    return sorted(boxes, key=lambda box: -box.score)[:max_objects]


def agreement(query_maps: np.ndarray, match_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How strongly each cell of each image agrees with the other image: (query [h, w], match [h, w]), 0..1.

    A cell's agreement is its best cosine with any cell of the other image, weighted by both cells'
    activation, so plain background matching plain background stays cold.
    """
    def cells(maps):
        flat = maps.reshape(maps.shape[0], -1).T
        return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9), activation(maps).ravel()

    (q, q_energy), (m, m_energy) = cells(query_maps), cells(match_maps)
    similarity = np.clip(q @ m.T, 0, 1)
    query_heat = (similarity * m_energy[None, :]).max(axis=1) * q_energy
    match_heat = (similarity * q_energy[:, None]).max(axis=0) * m_energy

    def scaled(heat, shape):
        heat = heat.reshape(shape)
        return heat / heat.max() if heat.max() > 0 else heat

    return scaled(query_heat, query_maps.shape[1:]), scaled(match_heat, match_maps.shape[1:])


def heatmap_png(image: Image.Image, cells: np.ndarray, preset: EvalPreset, *, width: int = 320) -> str:
    """The image with a heat map laid over it, as a PNG data URL."""
    image = image.convert("RGB")
    size = (width, max(1, round(image.height * width / image.width)))
    heat = to_image(cells, preset, image.size, out=size)
    shown = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32)
    colour = np.stack([np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat, 0, 1) * np.clip(2 - 2 * heat, 0, 1),
                       np.clip(1 - 2 * heat, 0, 1)], axis=-1) * 255  # blue, through yellow, to red
    alpha = (0.25 + 0.5 * heat)[..., None]
    blended = (shown * (1 - alpha) + colour * alpha).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
