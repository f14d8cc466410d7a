"""Safe decoding of untrusted bytes into model-ready RGB images.

Every input ends one of two ways: a fully loaded RGB ``PIL.Image.Image``, or an
``ImageDecodeError`` whose message a person can act on. The format is recognised
from the file's signature before any decoder runs, the pixel count is checked from
the header before any pixels are allocated, and truncated files are refused.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
import pillow_heif
import pyvips
from PIL import ExifTags, Image, ImageOps

# HEIC/HEIF, the format of every iPhone photo, through pillow-heif's plugin (AVIF is Pillow's own); both go
# through the same signature, size and decoding checks as every other format.
pillow_heif.register_heif_opener()

DEFAULT_ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"})
# Far above any master (a 24,000 x 24,000 scan); what stops a bomb below it is the pixels-per-byte ratio.
DEFAULT_MAX_PIXELS: int = 600_000_000
# Above this many pixels an image is decoded while it is shrunk (libvips), so memory stays bounded whatever
# its size: the model only ever needs a few hundred pixels a side.
SHRINK_ON_LOAD_PIXELS: int = 24_000_000
SHRUNK_MIN_SIDE: int = 1024  # the shorter side of a large image as decoded, at least (or ``min_side``)
# More pixels per byte of file than this, on an image above BOMB_CHECK_PIXELS, is a decompression bomb:
# a print master of flat artwork measured 216 (benchmarks/decode_memory.py), photos stay under 10, and a
# one-colour greyscale PNG, deflate's best, about 1,000. Bombs below the pixel cap that pass it decode
# shrunk anyway, in bounded memory.
MAX_PIXELS_PER_BYTE: int = 1_000
BOMB_CHECK_PIXELS: int = 16_000_000

_WHITE = (255, 255, 255)
# Far beyond any product photo; bounds the walk over page headers (about 0.1 ms each).
_MAX_TIFF_PAGES = 1000

# What Pillow raises on malformed data, from its plugins, decoders and size checks.
_PILLOW_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    ZeroDivisionError,
    OverflowError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,  # raised, not warned, when warnings are errors
)

# The same errors Image.open() ignores when a plugin's signature check trips on short data.
_ACCEPT_ERRORS = (SyntaxError, IndexError, TypeError, struct.error)


class ImageDecodeError(ValueError):
    """The bytes are not an image this service accepts; ``str(e)`` says why."""


@dataclass(frozen=True)
class ImageInfo:
    """The file's format and full size in pixels, after EXIF orientation."""

    format: str
    width: int
    height: int


def decode_image(
    data: bytes,
    *,
    allowed_formats: frozenset[str] = DEFAULT_ALLOWED_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """Decode ``data`` into an upright RGB image with transparency flattened onto white.

    Animated images give their first frame. With ``min_side``, a JPEG much larger than
    needed is decoded at 1/2, 1/4 or 1/8 scale, never below ``min_side`` on its shorter
    side; ``ImageInfo`` still reports the full size.

    Raises ``ImageDecodeError`` for anything that is not a whole, accepted image.
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive number of pixels, got {min_side}")
    image_format = _recognise_format(data, allowed_formats)
    try:
        image = _open(data, image_format)
        width, height = image.size
        _check_size(width, height, max_pixels)
        _check_ratio(width, height, len(data))
        _check_other_frames(image, image_format, data, max_pixels)
        if width * height > SHRINK_ON_LOAD_PIXELS:
            shrunk, upright = _decode_shrunk(data, width, height, max(min_side or 1, SHRUNK_MIN_SIDE))
            return shrunk, ImageInfo(format=image_format, width=upright[0], height=upright[1])
        if min_side is not None and image_format == "JPEG":
            # Asking for min_side x min_side picks the largest scale that keeps both sides >= it.
            image.draft("RGB", (min_side, min_side))
        image.load()
        loaded_size = image.size
        image = _upright(image)
        if image.size != loaded_size and image.size == loaded_size[::-1]:
            width, height = height, width
        image = _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image is too large to decode safely: {e}") from e
    except _PILLOW_ERRORS as e:
        raise ImageDecodeError(_corrupt_reason(e, image_format)) from e
    return image, ImageInfo(format=image_format, width=width, height=height)


def inspect_image(
    data: bytes,
    *,
    allowed_formats: frozenset[str] = DEFAULT_ALLOWED_FORMATS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> ImageInfo:
    """Validate ``data`` exactly as ``decode_image`` does, then drop the pixels.

    A full decode is the only way to know the file is not truncated, and running the
    same code guarantees that what passes at upload time decodes later. ``min_side``
    lets a large JPEG be checked at reduced size: draft mode still reads every byte of
    the compressed data, so truncation is caught, at a fraction of the cost.
    """
    _, info = decode_image(data, allowed_formats=allowed_formats, max_pixels=max_pixels, min_side=min_side)
    return info


def _recognise_format(data: bytes, allowed_formats: frozenset[str]) -> str:
    """Name the format from the file signature, using Pillow's own signature checks."""
    if not data:
        raise ImageDecodeError("not an image: the data is empty")
    Image.init()
    prefix = data[:16]  # what Image.open() hands to the same checks
    for name in sorted(allowed_formats):
        if name not in Image.OPEN:
            raise ValueError(f"{name!r} is not an image format this Pillow build can open")
        accept = Image.OPEN[name][1]
        if accept is None:
            raise ValueError(f"{name!r} has no file signature, so it cannot be recognised safely")
        verdict = _accepts(accept, prefix)
        if isinstance(verdict, str):  # the plugin's library is missing from this build
            raise ImageDecodeError(f"image format {name} cannot be decoded on this server: {verdict}")
        if verdict:
            return name
    accepted = ", ".join(sorted(allowed_formats))
    refused = _markup_kind(data) or _other_format(prefix, allowed_formats)
    if refused == "HTML":
        raise ImageDecodeError("not an image: the data is an HTML page, not an image file")
    if refused:
        raise ImageDecodeError(f"image format {refused} is not accepted (accepted: {accepted})")
    raise ImageDecodeError(
        f"not an image: the data matches no known image format (accepted: {accepted})"
    )


def _accepts(accept, prefix: bytes) -> bool | str:
    try:
        return accept(prefix)
    except _ACCEPT_ERRORS:
        return False


def _other_format(prefix: bytes, allowed_formats: frozenset[str]) -> str | None:
    """Name a format Pillow knows but the caller does not accept, so the refusal says which."""
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        # Formats without a signature (TGA, ...) would match anything.
        if name not in allowed_formats and accept is not None and _accepts(accept, prefix) is True:
            return name
    return None


def _markup_kind(data: bytes) -> str | None:
    """Recognise SVG and HTML, which people upload believing they are images."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if not head.startswith(b"<"):
        return None
    if head.startswith((b"<!doctype html", b"<html")) or b"<body" in head:
        return "HTML"  # checked first: pages often hold inline <svg> icons
    if b"<svg" in head:
        return "SVG"
    return None


def _open(data: bytes, image_format: str) -> Image.Image:
    """Parse the header with the plugin registered for ``image_format``; no pixels yet.

    This is what Image.open(formats=[image_format]) does, minus Pillow's global size
    check: our own cap runs next and names the size in its message.
    """
    factory = Image.OPEN[image_format][0]
    return factory(io.BytesIO(data), "")


def _check_size(width: int, height: int, max_pixels: int, what: str = "image is") -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image file is corrupt: it declares a size of {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{what} {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"over the {max_pixels / 1e6:.1f} megapixel limit"
        )


def _check_other_frames(image: Image.Image, image_format: str, data: bytes, max_pixels: int) -> None:
    """Refuse GIFs and TIFFs whose later frames are bombs.

    Only the first frame is decoded here, but the stored original may later be opened
    by something that walks every frame (a browser, a thumbnailer).
    """
    if image_format == "GIF":
        _check_size(*_gif_canvas(data), max_pixels, what="image frames span")
    elif image_format == "TIFF":
        page = 1
        try:
            while True:
                image.seek(page)  # reads the page's header, not its pixels
                if page >= _MAX_TIFF_PAGES:
                    raise ImageDecodeError(f"image has more than {_MAX_TIFF_PAGES} pages")
                _check_size(*image.size, max_pixels, what=f"image page {page + 1} is")
                page += 1
        except EOFError:  # past the last page
            pass
        if page > 1:
            image.seek(0)


def _gif_canvas(data: bytes) -> tuple[int, int]:
    """The canvas Pillow grows to when it plays every frame, read from block headers only."""
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while position < len(data):
        if data[position] == 0x2C:  # image descriptor: x, y, width, height, flags
            x, y, frame_width, frame_height, flags = struct.unpack_from("<HHHHB", data, position + 1)
            width, height = max(width, x + frame_width), max(height, y + frame_height)
            position += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # + LZW code size
        elif data[position] == 0x21:  # extension: introducer, label
            position += 2
        else:  # trailer, or garbage where Pillow stops reading too
            break
        while position < len(data) and data[position]:  # data sub-blocks, each length-prefixed
            position += data[position] + 1
        position += 1
    return width, height


def _check_ratio(width: int, height: int, size: int) -> None:
    pixels = width * height
    if pixels > BOMB_CHECK_PIXELS and pixels > MAX_PIXELS_PER_BYTE * size:
        raise ImageDecodeError(
            f"image is {width}x{height} = {pixels / 1e6:.0f} megapixels in a file of {size / 1e3:.0f} KB "
            f"({pixels / size:.0f} pixels per byte, over {MAX_PIXELS_PER_BYTE}): a decompression bomb, not a photo"
        )


def _decode_shrunk(data: bytes, width: int, height: int, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """A large image decoded while shrunk (libvips' thumbnail: JPEG shrinks on load, PNG and TIFF stream), so
    its shorter side is about ``min_side``; upright, flattened onto white, 8-bit sRGB. Also its full upright size."""
    scale = min(1.0, min_side / min(width, height))
    box = (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))
    try:
        image = pyvips.Image.thumbnail_buffer(data, box[0], height=box[1], size="down", fail_on="error")
        rotated = image.width != image.height and (image.width > image.height) != (box[0] > box[1])
        if image.hasalpha():
            image = image.flatten(background=[255] * (image.bands - 1))
        image = image.colourspace("srgb")
        if image.format != "uchar":
            image = image.cast("uchar")
        pixels = np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8,
                            shape=(image.height, image.width, image.bands))
    except pyvips.Error as e:
        reason = str(e).strip().splitlines()
        raise ImageDecodeError(f"image file is truncated or corrupt: {reason[-1] if reason else 'libvips failed'}") from e
    return Image.fromarray(np.ascontiguousarray(pixels[..., :3])), (height, width) if rotated else (width, height)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF (or XMP) orientation; unreadable metadata leaves the image as stored."""
    try:
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except _PILLOW_ERRORS:
        # Damaged metadata is common in camera files and says nothing about the pixels.
        return image
    if orientation not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparent pixels onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, _WHITE)
        flat.paste(rgba, mask=rgba)
        return flat
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer or float greyscale onto L, or LA when a value is transparent."""
    values = np.asarray(image)
    grey = _stretch(values)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    return Image.fromarray(grey)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Keep values already in 0..255; stretch any wider range linearly onto 0..255.

    The range comes from the pixels, not the bit depth: 12-bit scans and scientific
    TIFFs stored in 16 bits would come out black if divided by 257, and float images
    have no nominal range at all. A full-range 16-bit photo maps as if divided by 257.
    """
    values = values.astype(np.float32)
    values[~np.isfinite(values)] = 0
    low, high = float(values.min()), float(values.max())
    if (low >= 0 and high <= 255) or low == high:
        return np.clip(values, 0, 255).astype(np.uint8)
    return np.rint((values - low) * (255 / (high - low))).astype(np.uint8)


def _corrupt_reason(error: BaseException, image_format: str) -> str:
    detail = str(error)
    if not detail or detail.startswith("cannot identify image file"):
        detail = f"its {image_format} data could not be read ({type(error).__name__})"
    return f"image file is truncated or corrupt: {detail}"
