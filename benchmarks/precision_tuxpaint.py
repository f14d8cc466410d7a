"""int8 next to fp32 on the tuxpaint stamps: the catalog's own evaluation, and what `auto` chooses from it.

    .venv/bin/python benchmarks/precision_tuxpaint.py [--work DIR] [--limit N]

The catalog of benchmarks/finetune_tuxpaint.py (796 stamps as products, 30 % without a category, the offline
model: EfficientNet-Lite0 with ImageNet weights) is embedded, then `manage.py evaluate` measures the model
and compares fp32 with int8 (calibrated on 32 of the catalog's images, in a fresh TORCH_HOME) on the same
sample and shopper-like queries (catalog/precision_choice.py). Prints each precision's search recall@1,
category top-1 and embedding speed, and the choice with its reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import embedded_catalog, machine  # noqa: E402
from benchmarks.finetune_tuxpaint import stamp_catalog  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only this many stamps (a quick try)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="precision-tuxpaint-"))
    os.environ["TORCH_HOME"] = str(work / "torch")  # the int8 graph is calibrated on this catalog
    embedded_catalog(work)
    from django.core.management import call_command

    from catalog.model_versions import serving_version
    from ml.precision import machine_kind

    stamp_catalog(args.limit)
    started = time.perf_counter()
    call_command("evaluate")
    print(f"evaluation and precision comparison: {time.perf_counter() - started:.0f} s", flush=True)
    version = serving_version()
    decision = version.precision[machine_kind()]
    print(f"\n{decision['images']} catalog images, {decision['queries']} shopper-like queries; machine kind "
          f"{machine_kind()}")
    for name, figures in decision["figures"].items():
        speed = decision["images_per_s"].get(name)
        top1 = f"{figures['top1']:.3f}" if figures["top1"] is not None else "-"
        print(f"  {name:28s} recall@1 {figures['recall_at_1']:.3f}  top-1 {top1}"
              + (f"  {speed:.1f} images/s (catalog embedding, decoding included)" if speed else ""))
    print(f"auto on this machine kind: {decision['chosen']}: {decision['reason']}")
    print(machine())


if __name__ == "__main__":
    main()
