"""Fine-tuning on the tuxpaint stamps: the catalog's own evaluation before and after, and the decision.

    .venv/bin/python benchmarks/finetune_tuxpaint.py [--epochs N] [--work DIR]

The 796 PNG stamps of Debian's tuxpaint-stamps-default become 796 products (one image each) in a fresh
embedded catalog (SQLite, tasks in-process), their category the stamp's top folder (16 categories), hidden
for 30 % of the products (by a seeded hash). Every image is embedded by the offline model (EfficientNet-Lite0,
ImageNet weights), then `manage.py evaluate` measures it, and `manage.py finetune` fine-tunes it with the
CPU recipe (docs/finetuning.md; the share of fine-tuned weights chosen on photos of its own), embeds every
image into the candidate's shadow index, evaluates both models on the same queries and promotes the
candidate only if it wins. Prints the figures, the times and the decision.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import embedded_catalog, machine  # noqa: E402

STAMPS = Path("/tmp/tuxpaint/usr/share/tuxpaint/stamps")
HIDDEN_SHARE = 0.3


def stamps() -> Path:
    if not STAMPS.is_dir():
        subprocess.run("cd /tmp && apt-get download tuxpaint-stamps-default && "
                       "dpkg -x tuxpaint-stamps-default_*.deb /tmp/tuxpaint", shell=True, check=True)
    return STAMPS


def hidden(name: str) -> bool:
    return int.from_bytes(hashlib.sha256(f"hidden:{name}".encode()).digest()[:4], "big") / 2**32 < HIDDEN_SHARE


def stamp_catalog(limit: int | None = None) -> None:
    """Every stamp (or the first ``limit``) as a product of the embedded catalog, embedded and indexed."""
    from catalog import pipeline, services

    files = sorted(stamps().rglob("*.png"))[:limit]
    started = time.perf_counter()
    ids = []
    for number, path in enumerate(files):
        category = path.relative_to(STAMPS).parts[0]
        parent = None if hidden(path.name) else services.category_get_or_create_path(path=category)
        product = services.product_create(sku=f"STAMP-{number:04d}", title=path.stem, category=parent)
        ids.append(services.product_image_add(product=product, data=path.read_bytes(), filename=path.name,
                                              queue=False)[0].pk)
    pipeline.images_queue_embedding(image_ids=ids)  # in-process: embeds and indexes
    print(f"catalog: {len(files)} stamps, {sum(not hidden(p.name) for p in files)} with a category; embedded and "
          f"indexed in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only this many stamps (a quick try)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="finetune-tuxpaint-"))
    embedded_catalog(work)
    from django.core.management import call_command

    from catalog.models import ModelVersion

    stamp_catalog(args.limit)

    started = time.perf_counter()
    call_command("evaluate")
    print(f"evaluation of the ImageNet model: {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    call_command("finetune", *(["--epochs", str(args.epochs)] if args.epochs is not None else []))
    seconds = time.perf_counter() - started
    version = ModelVersion.objects.filter(parent__isnull=False).order_by("-id").first()
    training = version.decision.get("training", {})
    print(f"fine-tuning, shadow index, evaluation and decision: {seconds / 60:.1f} min "
          f"(training {training.get('seconds', 0) / 60:.1f} min, {len(training.get('epochs', []))} epochs, "
          f"{training['epochs'][-1]['images_per_s']:.1f} images/s)" if training.get("epochs") else "", flush=True)
    mix = version.decision.get("mix")
    if mix:
        print(f"mix chosen: {mix['chosen']:g} of the fine-tuned weights; search recall@1 of each share on the "
              f"selection photos (not the evaluation's): {mix['recall_at_1']} ({mix['queries']} queries, "
              f"{mix['seconds']} s)", flush=True)
    for name, metrics in (("ImageNet model", version.compared_metrics), ("fine-tuned", version.metrics)):
        search, categories = metrics["search"], metrics["categories"]
        print(f"{name:>15}: search recall@1 {search['recall_at_1']:.3f}, recall@10 {search['recall_at_10']:.3f}, "
              f"MRR {search['mrr']:.3f}; category top-1 {categories['top1']:.3f}, top-5 {categories['top5']:.3f} "
              f"({metrics['queries']} queries, {categories['images']} held-out images)", flush=True)
    print(f"decision: {version.status}: {version.decision.get('why')}", flush=True)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
