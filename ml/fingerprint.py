"""A perceptual hash of how an image looks: 64 bits that survive resizing, re-compression and colour shifts.

The second signal for near-duplicates (``catalog.duplicates``). An embedding scored at the image's own
resolution drifts when a copy is much smaller than its original (a 40 % copy of a 100-pixel stamp is
upsampled five-fold before the network sees it); the hash looks at both at 32 x 32 pixels, so the size of
either does not matter. It is ImageHash's DCT hash (the pHash of imagededup and of most de-duplication
tools), taken on the decoded image, transparency already flattened onto white.
"""
from __future__ import annotations

import imagehash
from PIL import Image

BITS = 64


def perceptual_hash(image: Image.Image) -> int:
    """The image's 64-bit DCT hash as a signed integer (it fits a database's bigint)."""
    bits = imagehash.phash(image.convert("RGB")).hash.ravel()
    value = int("".join("1" if bit else "0" for bit in bits), 2)
    return value - (1 << BITS) if value >= 1 << (BITS - 1) else value


def hash_distance(a: int, b: int) -> int:
    """How many of the 64 bits differ between two hashes from ``perceptual_hash``."""
    return ((a ^ b) & ((1 << BITS) - 1)).bit_count()
