"""Eval presets: how an RGB image becomes a model's input pixels, as each backbone's weights expect.

As torchvision's ``references/classification/presets.py``: a preset is a small object made from
what the weights were trained with (geometry, interpolation, normalisation). It needs only Pillow
and numpy, so a process that runs an exported graph never imports PyTorch for it. The arithmetic
of ``center_crop`` is torchvision's (``resize`` of the short side, then a rounded centre crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PREPROCESS_MODES = ("auto", "center_crop", "pad")
# Padding finds same-category neighbours better on product-like images: docs/preprocessing.md.
DEFAULT_PREPROCESS = "pad"

_PAD_FILL = (255, 255, 255)  # product photos sit on white; padding extends that background


@dataclass(frozen=True)
class EvalPreset:
    """What the weights were trained with: centre-crop geometry, interpolation, normalisation.

    ``pixels`` gives uint8 arrays [3, crop, crop] (cheap, in worker threads); normalisation runs
    batched where the model runs, which is cheaper than per image and moves a quarter of the bytes
    to a GPU.
    """

    resize_size: int  # the short side before the centre crop
    crop_size: int
    resample: Image.Resampling
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = DEFAULT_PREPROCESS

    @property
    def min_side(self) -> int:
        """The fewest pixels a decoded image needs on its short side for this preset."""
        return self.resize_size if self.mode == "center_crop" else self.crop_size

    def geometry(self, image: Image.Image) -> Image.Image:
        """The crop-size square the model sees."""
        return self._center_crop(image) if self.mode == "center_crop" else self._pad(image)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image to the model's input pixels, uint8 [3, crop, crop]; thread-safe."""
        square = self.geometry(image if image.mode == "RGB" else image.convert("RGB"))
        return np.ascontiguousarray(np.asarray(square, dtype=np.uint8).transpose(2, 0, 1))

    def _center_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, self.resample)
        top = int(round((image.height - self.crop_size) / 2.0))
        left = int(round((image.width - self.crop_size) / 2.0))
        return image.crop((left, top, left + self.crop_size, top + self.crop_size))

    def _pad(self, image: Image.Image) -> Image.Image:
        """Fit the whole image in the crop square, keeping its aspect ratio, on white."""
        width, height = image.size
        scale = self.crop_size / max(width, height)
        fitted_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        fitted = image.resize(fitted_size, self.resample)
        canvas = Image.new("RGB", (self.crop_size, self.crop_size), _PAD_FILL)
        canvas.paste(fitted, ((self.crop_size - fitted_size[0]) // 2, (self.crop_size - fitted_size[1]) // 2))
        return canvas


def resample_named(name: str) -> Image.Resampling:
    """Pillow's filter for an interpolation name as torchvision and timm write it ("bilinear", "bicubic")."""
    try:
        return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}") from None
