"""Where the fine-tuning recipe's training views and loss were chosen: the stamps, on photos of their own.

    .venv/bin/python benchmarks/finetune_choice.py [--projection N] [--no-zoom-out] [--shares 0.25,0.5,1]

The same stamps, categories and held-out products as `benchmarks/finetune_tuxpaint.py` (product and image
ids 1..796 in file order, as that benchmark's fresh catalog numbers them), trained by `ml.finetune` with the
CPU recipe, outside the service. Measured by search recall@1 on 600 shopper-like photos of another salt
than the evaluation's and the mix choice's, so the photos the service's evaluation reports on never guided
the choice. Prints the ImageNet model's figures, then each share of fine-tuned weights' (WiSE-FT), overall
and per family of the photos' transformations.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine  # noqa: E402
from benchmarks.finetune_tuxpaint import STAMPS, hidden, stamps  # noqa: E402

SALT = "experiment-2026-12-02"  # neither the evaluation's salt nor the mix choice's
FAMILIES = ("clutter", "perspective", "rotation", "lighting_white_balance", "blur_noise", "jpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projection", type=int, default=None, help="the recipe's unless given; 0: none")
    parser.add_argument("--no-zoom-out", action="store_true", help="training views without zooming out")
    parser.add_argument("--shares", default="0.25,0.5,1")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()

    from ml import augment
    from ml.catalog_eval import CatalogVectors, held_out, query_plan, rank_products, search_metrics, shopper_queries
    from ml.embedder import load_embedder
    from ml.finetune import TrainingImage, default_config, finetune, write_mix
    from ml.images import decode_image

    if args.no_zoom_out:
        augment.ZOOM_OUT_CHANCE = 0.0
    files = sorted(stamps().rglob("*.png"))
    ids = list(range(1, len(files) + 1))
    decoded: dict[int, object] = {}

    def load(image_id: int):
        if image_id not in decoded:
            decoded[image_id] = decode_image(files[image_id - 1].read_bytes(), min_side=448)[0]
        return decoded[image_id]

    plan = query_plan([(i, i) for i in ids], salt=SALT)
    photos = shopper_queries(plan, load, augment.cluttered_backgrounds())  # the same photos for every model

    def measure(weights, name: str) -> None:
        model = load_embedder("efficientnet_lite0", weights, device="cpu", precision="fp32", engine="torch")
        catalog = model.embed([load(i) for i in ids]).vectors
        ranked = rank_products(CatalogVectors(np.array(ids), np.array(ids), catalog), plan,
                               model.embed([photo for _, photo, _ in photos]).vectors)
        figures = search_metrics(ranked, plan, {})
        hit = ranked.products[:, 0] == ranked.truth
        by_family = {family: f"{hit[[family in used for _, _, used in photos]].mean():.3f}" for family in FAMILIES}
        print(f"{name}: recall@1 {figures['recall_at_1']:.3f}, recall@10 {figures['recall_at_10']:.3f}, "
              f"MRR {figures['mrr']:.3f}; recall@1 by family {by_family}", flush=True)

    measure("imagenet", "ImageNet model")
    config = default_config("efficientnet_lite0", "cpu", args.epochs)
    config = dataclasses.replace(config, mix_choices=(), **({} if args.projection is None else
                                                           {"projection": args.projection}))
    categories = {i: None if hidden(files[i - 1].name) else files[i - 1].relative_to(STAMPS).parts[0] for i in ids}
    numbers = {name: n for n, name in enumerate(sorted({c for c in categories.values() if c}))}
    training = [TrainingImage(product=i, category=numbers.get(categories[i]), load=(lambda i=i: load(i)))
                for i in ids if not held_out(i)]
    work = Path(tempfile.mkdtemp(prefix="finetune-choice-"))
    started = time.perf_counter()
    history = finetune(backbone="efficientnet_lite0", weights="imagenet", images=training, out=work / "mixed.pth",
                       config=config, device="cpu", finetuned_out=work / "finetuned.pth")
    print(f"trained on {len(training)} stamps: {config.epochs} epochs, projection {config.projection}, zoom-out "
          f"chance {augment.ZOOM_OUT_CHANCE:g}, {time.perf_counter() - started:.0f} s "
          f"({history['epochs'][-1]['images_per_s']:.1f} images/s)", flush=True)
    for share in (float(s) for s in args.shares.split(",")):
        path = work / f"mix-{share:g}.pth"
        write_mix(backbone="efficientnet_lite0", weights="imagenet", finetuned=work / "finetuned.pth", share=share,
                  out=path)
        measure(path, f"share {share:g} fine-tuned")
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
