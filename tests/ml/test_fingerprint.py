"""Perceptual hashes: a resized, re-compressed copy keeps its hash; different photos do not share one."""
import io
from itertools import combinations

from PIL import Image

from ml.fingerprint import hash_distance, perceptual_hash
from tests.ml.photos import photo

NAMES = ("coffee", "chelsea", "rocket", "astronaut", "camera")


def jpeg_copy(image: Image.Image, scale: float) -> Image.Image:
    small = image.resize((max(8, int(image.width * scale)), max(8, int(image.height * scale))))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=50)
    return Image.open(io.BytesIO(out.getvalue()))


def test_a_smaller_recompressed_copy_is_a_few_bits_from_its_original():
    for name in NAMES:
        original = photo(name)
        for scale in (0.1, 0.4):
            assert hash_distance(perceptual_hash(original), perceptual_hash(jpeg_copy(original, scale))) <= 6, name


def test_different_photos_are_far_apart_and_hashes_fit_a_signed_bigint():
    hashes = {name: perceptual_hash(photo(name)) for name in NAMES}
    assert all(-(2**63) <= value < 2**63 for value in hashes.values())
    for a, b in combinations(NAMES, 2):
        assert hash_distance(hashes[a], hashes[b]) > 16, (a, b)
    assert hash_distance(hashes["coffee"], hashes["coffee"]) == 0
