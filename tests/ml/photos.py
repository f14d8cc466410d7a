"""Real photos for the model tests: scikit-image's bundled ones, and varied crops of them."""
import numpy as np
from PIL import Image
from skimage import data


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    image = Image.fromarray(pixels[..., :3])
    return image.resize(size) if size else image


def crops(count: int, seed: int = 0) -> list[Image.Image]:
    """Varied real-photo crops: near-duplicates and strangers, so neighbour lists mean something."""
    sources = [photo(name) for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        source = sources[index % len(sources)]
        side = int(rng.integers(min(source.size) // 3, min(source.size)))
        left = int(rng.integers(0, source.width - side + 1))
        top = int(rng.integers(0, source.height - side + 1))
        images.append(source.crop((left, top, left + side, top + side)).resize((96, 96)))
    return images
