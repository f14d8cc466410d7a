"""Fixtures shared by every test package."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus" / "images"


def photo_bytes(name: str = "chelsea", fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    """A real photo from scikit-image's bundled data, encoded as `fmt`."""
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    img = Image.fromarray(pixels[..., :3].astype(np.uint8))
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def photo():
    return photo_bytes
