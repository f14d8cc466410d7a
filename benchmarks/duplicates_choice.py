"""Where the near-duplicate rules were chosen: photos and test images that are not the stamps' benchmark.

    .venv/bin/python benchmarks/duplicates_choice.py

The split: scikit-image's photos and the shared corpus's images that decode, less the 50 that
`benchmarks/duplicates_tuxpaint.py` adds as unrelated images, kept only where no two are alike (cosine
under 0.7 to every one kept before, so the corpus's many renderings of one test picture count once). Each
gets one copy altered as the benchmark alters the stamps (another random stream). Positives: an image and
its copy; negatives: every pair of two different images. For each lower cosine and each hash distance it
prints the share of copies paired (cosine >= `VISUALSEARCH_DUPLICATE_SCORE`, or cosine >= the lower one with
perceptual hashes at most that many bits apart) and how many negative pairs pass. The setting in use: the
hash distance is imagededup's default (10 of 64 bits), not chosen here; the lower cosine is the lowest of
the grid at which at most one negative pair in 5,000 passes.
"""
from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import embedded_catalog, machine  # noqa: E402
from benchmarks.duplicates_tuxpaint import UNRELATED, altered, photo_pool, unrelated_images  # noqa: E402

LOWER = (0.4, 0.5, 0.55, 0.6, 0.65, 0.7)
BITS = (6, 8, 10, 12)
DISTINCT = 0.7


def main() -> None:
    embedded_catalog(Path(tempfile.mkdtemp(prefix="duplicates-choice-")))
    from django.conf import settings

    from catalog.serving import get_embedder
    from ml.fingerprint import hash_distance, perceptual_hash
    from ml.images import decode_image

    embedder = get_embedder()
    benchmark_unrelated = set(unrelated_images(embedder, UNRELATED))
    images = [decode_image(data)[0] for data in photo_pool() if data not in benchmark_unrelated]
    vectors = embedder.embed(images).vectors
    kept: list[int] = []
    for i in range(len(images)):
        if all(float(vectors[i] @ vectors[j]) < DISTINCT for j in kept):
            kept.append(i)
    images, vectors = [images[i] for i in kept], vectors[kept]
    hashes = [perceptual_hash(image) for image in images]

    rng = np.random.default_rng(1)  # the benchmark's copies use stream 0
    copy_cos, copy_bits = [], []
    for image, vector, image_hash in zip(images, vectors, hashes):
        png = io.BytesIO()
        image.save(png, format="PNG")
        copy = decode_image(altered(png.getvalue(), rng))[0]
        copy_cos.append(float(embedder.embed([copy]).vectors[0] @ vector))
        copy_bits.append(hash_distance(image_hash, perceptual_hash(copy)))
    copy_cos, copy_bits = np.array(copy_cos), np.array(copy_bits)
    upper = np.triu_indices(len(images), 1)
    pair_cos = (vectors @ vectors.T)[upper]
    pair_bits = np.array([hash_distance(hashes[a], hashes[b]) for a, b in zip(*upper)])

    threshold = settings.DUPLICATE_SCORE
    print(f"split: {len(images)} distinct images (of the pool, less the benchmark's {UNRELATED} unrelated), one "
          f"altered copy each; {len(pair_cos)} negative pairs", flush=True)
    print(f"cosine >= {threshold} alone: copies {np.mean(copy_cos >= threshold):.3f}; negative pairs passing "
          f"{int(np.sum(pair_cos >= threshold))}", flush=True)
    for lower in LOWER:
        for bits in BITS:
            paired = np.mean((copy_cos >= threshold) | ((copy_cos >= lower) & (copy_bits <= bits)))
            passing = int(np.sum((pair_cos >= threshold) | ((pair_cos >= lower) & (pair_bits <= bits))))
            print(f"lower cosine {lower:.2f}, hashes <= {bits:2d} bits apart: copies {paired:.3f}; "
                  f"negative pairs passing {passing}", flush=True)
    print(f"in use: lower cosine {settings.DUPLICATE_HASH_SCORE}, {settings.DUPLICATE_HASH_BITS} bits", flush=True)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
