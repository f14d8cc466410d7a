"""Near-duplicates on the tuxpaint stamps: altered copies under new skus are found, unrelated images are not.

    .venv/bin/python benchmarks/duplicates_tuxpaint.py [--work DIR]

A fresh embedded catalog (SQLite, tasks in-process, EfficientNet-Lite0 with ImageNet weights) of the 796
stamps, one product each. Then, as new products: 50 altered copies of stamps chosen at random (each resized
to 40-80 %, cropped by up to 6 % a side, colour and brightness shifted, re-compressed as JPEG at quality
50-85), and 50 unrelated images: scikit-image's bundled photos and the shared corpus's images that decode,
taken greedily so that no two of them look alike (cosine under 0.5 to every one taken before), so the 50
are unrelated to each other as well. `GET /api/duplicates/` (its service) is read once everything is
indexed. Reported: the share of copies grouped with their original (target >= 90 %) and the share of
unrelated images in any group (target <= 5 %). The score threshold (`VISUALSEARCH_DUPLICATE_SCORE`) was
chosen on scikit-image's photos and their copies, and the perceptual-hash rule below it
(`VISUALSEARCH_DUPLICATE_HASH_SCORE`, `VISUALSEARCH_DUPLICATE_HASH_BITS`) on `benchmarks/duplicates_choice.py`'s
split, never on the stamps.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import embedded_catalog, machine  # noqa: E402
from benchmarks.finetune_tuxpaint import stamps  # noqa: E402

COPIES = 50
UNRELATED = 50
SKIMAGE = ("astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
           "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
           "retina", "rocket", "text")


def altered(data: bytes, rng: np.random.Generator) -> bytes:
    from PIL import Image, ImageEnhance

    image = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    w, h = flat.size
    scale = rng.uniform(0.4, 0.8)
    image = flat.resize((max(8, int(w * scale)), max(8, int(h * scale))))
    w, h = image.size
    cut = [int(side * rng.uniform(0, 0.06)) for side in (w, h, w, h)]
    image = image.crop((cut[0], cut[1], w - cut[2], h - cut[3]))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=int(rng.integers(50, 86)))
    return out.getvalue()


def photo_pool() -> list[bytes]:
    """scikit-image's photos and the shared corpus's images that decode (64 px or more), as JPEG."""
    from catalog.demo import skimage_photo
    from ml.images import ImageDecodeError, decode_image

    candidates = []
    for name in SKIMAGE:
        try:
            image = skimage_photo(name)
        except Exception:  # noqa: BLE001 - a photo this scikit-image build would have to download
            continue
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        candidates.append(out.getvalue())
    corpus = REPO.parent / "shared" / "corpus" / "images"
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            image, _ = decode_image(data, min_side=64)
        except ImageDecodeError:
            continue
        if min(image.size) >= 64:
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            candidates.append(out.getvalue())
    return candidates


def unrelated_images(embedder, count: int) -> list[bytes]:
    """``count`` images of the pool unrelated to the stamps and to each other."""
    from PIL import Image

    chosen, vectors = [], []
    for data in photo_pool():
        vector = embedder.embed([Image.open(io.BytesIO(data)).convert("RGB")]).vectors[0]
        if all(float(vector @ other) < 0.5 for other in vectors):
            chosen.append(data)
            vectors.append(vector)
        if len(chosen) == count:
            break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="duplicates-tuxpaint-"))
    embedded_catalog(work)
    from django.conf import settings

    from catalog import pipeline, services
    from catalog.duplicates import duplicate_groups
    from catalog.serving import get_embedder

    files = sorted(stamps().rglob("*.png"))

    def add(sku: str, data: bytes, name: str) -> int:
        product = services.product_create(sku=sku, title=sku)
        return services.product_image_add(product=product, data=data, filename=name, queue=False)[0].pk

    originals = [add(f"STAMP-{number:04d}", path.read_bytes(), path.name) for number, path in enumerate(files)]
    pipeline.images_queue_embedding(image_ids=originals)
    rng = np.random.default_rng(0)
    picked = rng.choice(len(files), size=COPIES, replace=False)
    copies = {add(f"COPY-{n:02d}", altered(files[i].read_bytes(), rng), "copy.jpg"): originals[i]
              for n, i in enumerate(picked.tolist())}
    unrelated = [add(f"OTHER-{n:02d}", data, "other.jpg") for n, data in enumerate(unrelated_images(get_embedder(),
                                                                                                   UNRELATED))]
    pipeline.images_queue_embedding(image_ids=list(copies) + unrelated)

    groups = [{image["id"] for image in group["images"]} for group in duplicate_groups(limit=100_000)]
    found = sum(any(copy in group and original in group for group in groups) for copy, original in copies.items())
    paired = sum(any(image in group for group in groups) for image in unrelated)
    among = sum(len(group) for group in groups if not group & (set(copies) | set(unrelated)))
    print(f"catalog: {len(files)} stamps; {COPIES} altered copies and {len(unrelated)} unrelated images added as new "
          f"products; cosine >= {settings.DUPLICATE_SCORE}, or >= {settings.DUPLICATE_HASH_SCORE} with perceptual hashes "
          f"at most {settings.DUPLICATE_HASH_BITS} bits apart", flush=True)
    print(f"copies grouped with their original: {found}/{COPIES} = {found / COPIES:.0%} (target >= 90 %)", flush=True)
    print(f"unrelated images in a group: {paired}/{len(unrelated)} = {paired / max(1, len(unrelated)):.0%} "
          f"(target <= 5 %)", flush=True)
    print(f"groups: {len(groups)}; stamps grouped among themselves (look-alike or recoloured stamps of the "
          f"package): {among}", flush=True)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
