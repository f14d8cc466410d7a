"""Image transformations in two disjoint families: training views, and the shopper photos evaluation asks with.

Fine-tuning learns from ``training_view``: crop and zoom (in, and out onto a white canvas), mirror,
saturation. Evaluation queries come from ``shopper_photo``: perspective, rotation, lighting and white
balance, blur and noise, JPEG re-compression, and the product pasted small on a cluttered background. No
family is in both, so a model cannot score well on the evaluation by having learnt its transformations
(``TRAINING_FAMILIES`` and ``EVALUATION_FAMILIES`` say which is which; a test holds them apart).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter, ImageOps

TRAINING_FAMILIES = frozenset({"crop_zoom", "mirror", "saturation"})
EVALUATION_FAMILIES = frozenset({"perspective", "rotation", "lighting_white_balance", "blur_noise", "jpeg", "clutter"})

_WHITE = (255, 255, 255)
# Zooming out: how often, and the product's share of the frame's side (docs/finetuning.md says why).
ZOOM_OUT_CHANCE = 0.6
ZOOM_OUT_SIDE = (0.35, 1.0)


# ----- training views ---------------------------------------------------------------------------


def training_view(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """A random training view of ``image`` and the families it used."""
    image = image.convert("RGB")
    used = ["crop_zoom"]
    width, height = image.size
    area = width * height * rng.uniform(0.35, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = int(min(width, round(math.sqrt(area * aspect))))
    crop_h = int(min(height, round(math.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
        used.append("mirror")
    if rng.random() < 0.8:
        grey = image.convert("L").convert("RGB")
        image = Image.blend(grey, image, float(rng.uniform(0.4, 1.6)))
        used.append("saturation")
    if rng.random() < ZOOM_OUT_CHANCE:  # zoom out: the product smaller in the frame, on white as a product shot
        side = int(max(image.size) / rng.uniform(*ZOOM_OUT_SIDE))
        canvas = Image.new("RGB", (side, side), _WHITE)
        corner = (int(rng.integers(0, side - image.width + 1)), int(rng.integers(0, side - image.height + 1)))
        canvas.paste(image, corner)
        image = canvas
    return image, used


# ----- shopper photos -----------------------------------------------------------------------------


def shopper_photo(image: Image.Image, rng: np.random.Generator, backgrounds: list[Image.Image] | None = None,
                  *, families: int = 3) -> tuple[Image.Image, list[str]]:
    """A photo of the product as a shopper's phone might take it: ``families`` of the evaluation's
    transformations, chosen at random, and the families used. With ``backgrounds``, "clutter" may paste
    the product on one of them at a fraction of the frame."""
    available = sorted(EVALUATION_FAMILIES - (set() if backgrounds else {"clutter"}))
    chosen = set(rng.choice(available, size=min(families, len(available)), replace=False).tolist())
    photo = image.convert("RGB")
    order = ("clutter", "perspective", "rotation", "lighting_white_balance", "blur_noise", "jpeg")
    for family in order:
        if family in chosen:
            photo = _TRANSFORMS[family](photo, rng, backgrounds)
    return photo, [family for family in order if family in chosen]


def _clutter(image, rng, backgrounds):
    """The product at 35-65 % of the frame's side, somewhere on a busy background."""
    background = backgrounds[int(rng.integers(len(backgrounds)))].convert("RGB")
    side = max(image.size) / rng.uniform(0.35, 0.65)
    canvas = ImageOps.fit(background, (int(side), int(side * rng.uniform(0.75, 1.33))))
    x = int(rng.integers(0, max(1, canvas.width - image.width)))
    y = int(rng.integers(0, max(1, canvas.height - image.height)))
    mask = _foreground_mask(image)
    canvas.paste(image, (x, y), mask)
    return canvas


def _foreground_mask(image: Image.Image) -> Image.Image:
    """Where the product is on a white product shot (the background is not pasted)."""
    pixels = np.asarray(image, dtype=np.int16)
    foreground = (np.abs(pixels - 255).max(axis=2) > 12).astype(np.uint8) * 255
    return Image.fromarray(foreground).filter(ImageFilter.MaxFilter(3))


def _perspective(image, rng, backgrounds):
    width, height = image.size
    shift = rng.uniform(0.04, 0.14, size=8) * np.array([width, height] * 4) * rng.choice([-1, 1], size=8)
    corners = np.array([0, 0, 0, height, width, height, width, 0], dtype=np.float64) + shift
    coefficients = _perspective_coefficients(corners.reshape(4, 2), [(0, 0), (0, height), (width, height), (width, 0)])
    return image.transform(image.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC,
                           fillcolor=_WHITE)


def _perspective_coefficients(source, target) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(source, dtype=np.float64).ravel()).tolist()


def _rotation(image, rng, backgrounds):
    return image.rotate(float(rng.uniform(8, 25) * rng.choice([-1, 1])), Image.Resampling.BICUBIC, expand=True,
                        fillcolor=_WHITE)


def _lighting_white_balance(image, rng, backgrounds):
    pixels = np.asarray(image, dtype=np.float32) / 255
    gains = rng.uniform(0.8, 1.2, size=3)  # a colour cast
    gamma = rng.uniform(0.7, 1.4)  # under- or over-exposed
    pixels = np.clip(pixels * gains, 0, 1) ** gamma
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def _blur_noise(image, rng, backgrounds):
    blurred = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    pixels = np.asarray(blurred, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(4, 12), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _jpeg(image, rng, backgrounds):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(25, 55)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


_TRANSFORMS = {
    "clutter": _clutter,
    "perspective": _perspective,
    "rotation": _rotation,
    "lighting_white_balance": _lighting_white_balance,
    "blur_noise": _blur_noise,
    "jpeg": _jpeg,
}


def cluttered_backgrounds() -> list[Image.Image]:
    """Busy scenes to paste products on: scikit-image's bundled photos and textures."""
    from skimage import data  # on first use: scikit-image takes a second to import

    names = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "immunohistochemistry",
             "hubble_deep_field", "colorwheel", "retina", "cat")
    backgrounds = []
    for name in names:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        backgrounds.append(Image.fromarray(np.asarray(pixels[..., :3], dtype=np.uint8)))
    return backgrounds
