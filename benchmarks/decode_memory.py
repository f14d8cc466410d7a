"""Peak memory of decoding one image, over the shared corpus and a few large masters made here.

    .venv/bin/python benchmarks/decode_memory.py [--corpus ../shared/corpus/images] [--masters DIR]

Each file is decoded as the embedding pipeline does (``ml.images.decode_image``, min_side 256). Corpus files
in one process, its resident high-water mark reset before each (Linux: /proc/self/clear_refs): that decode's
peak above what the process held before it (memory freed by an earlier decode may be reused unseen). Each
master in a fresh process of its own: its peak resident size above what it held before the decode. Made here: a 10,500 x 16,000 PNG of flat
artwork (a print master), a 45-megapixel camera JPEG, the artwork as a 12,000 x 20,000 TIFF, and two PNG bombs
of one colour (24,000 and 40,000 pixels a side, deflate's best). Prints, per group, how many decoded, how many
were refused and the largest peak, and each master's peak, time and decoded size. Target: under 300 MB.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine  # noqa: E402
from ml.images import ImageDecodeError, decode_image  # noqa: E402

MIN_SIDE = 256


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_of(data: bytes) -> tuple[int, float, str]:
    """(peak bytes above the resident size before, seconds, what came out)."""
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from now
    before = _status("VmRSS")
    started = time.perf_counter()
    try:
        image, info = decode_image(data, min_side=MIN_SIDE)
        outcome = f"decoded {info.width}x{info.height} as {image.size[0]}x{image.size[1]}"
    except ImageDecodeError as exc:
        outcome = f"refused: {exc}"
    seconds = time.perf_counter() - started
    return _status("VmHWM") - before, seconds, outcome


def one_fresh(path: Path) -> str:
    """Decode ``path`` in a fresh process: its peak resident size above what it held before the decode."""
    import json

    done = subprocess.run([sys.executable, __file__, "--one", str(path)], capture_output=True, text=True, check=True)
    peak, seconds, outcome = json.loads(done.stdout.strip().splitlines()[-1])
    return f"peak {peak / 2**20:.0f} MB, {seconds:.2f} s, {outcome}"


def _one(path: Path) -> None:
    import json

    data = path.read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    try:
        image, info = decode_image(data, min_side=MIN_SIDE)
        outcome = f"decoded {info.width}x{info.height} as {image.size[0]}x{image.size[1]}"
    except ImageDecodeError as exc:
        outcome = f"refused: {exc}"
    seconds = time.perf_counter() - started
    print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, seconds, outcome]))


def make_masters(directory: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    Image.MAX_IMAGE_PIXELS = None
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    path = directory / "print-master-168mp.png"
    if not path.exists():
        art = Image.new("RGB", (10500, 16000), "white")
        draw = ImageDraw.Draw(art)
        for i in range(40):
            draw.ellipse((200 + i * 240, 300 + i * 380, 2200 + i * 240, 2600 + i * 380),
                         fill=(30 + i * 5, 90, 200 - i * 4))
        art.save(path)
        del art
    made.append(path)
    rng = np.random.default_rng(0)
    path = directory / "camera-45mp.jpg"
    if not path.exists():
        texture = Image.fromarray(rng.integers(0, 255, (550, 820, 3), dtype=np.uint8))
        texture.resize((8200, 5500), Image.BICUBIC).save(path, quality=90)
    made.append(path)
    path = directory / "scan-240mp.tif"
    if not path.exists():
        Image.open(directory / "print-master-168mp.png").resize((12000, 20000)).save(path, compression="tiff_deflate")
    made.append(path)
    for name, side in (("bomb-576mp.png", 24000), ("bomb-1600mp.png", 40000)):
        path = directory / name
        if not path.exists():
            Image.new("L", (side, side), 255).save(path, optimize=True)
        made.append(path)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--masters", type=Path, default=Path(tempfile.gettempdir()) / "visualsearch-masters")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return _one(args.one)

    files = sorted(p for p in args.corpus.rglob("*") if p.is_file())
    decoded = refused = 0
    worst = (0, "")
    for path in files:
        peak, _, outcome = peak_of(path.read_bytes())
        decoded += outcome.startswith("decoded")
        refused += outcome.startswith("refused")
        worst = max(worst, (peak, path.name))
    print(f"corpus: {len(files)} files, {decoded} decoded, {refused} refused cleanly, none crashed; largest peak "
          f"{worst[0] / 2**20:.0f} MB ({worst[1]})", flush=True)
    for path in make_masters(args.masters):  # each in a process of its own: no memory freed before to reuse
        print(f"{path.name} ({path.stat().st_size / 1e6:.1f} MB): {one_fresh(path)}", flush=True)
    print(machine(), flush=True)


if __name__ == "__main__":
    main()
