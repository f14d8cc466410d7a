"""Command line: embed a folder of images, or classify one.

    python -m ml embed PATHS... --out vectors.npy [--backbone ...] [--weights ...] [--batch N]
    python -m ml classify FILE [--backbone ...] [--weights ...]

``embed`` writes the vectors (.npy, float32 [n, dim]) and, beside them, the path of each row
(``vectors.paths.txt``), and prints one JSON summary as its last stdout line.
Errors a user can fix exit with status 2 and a message, never a traceback.

Without ResNet-50's ImageNet weights on the machine, EfficientNet-Lite0 embeds instead, with a warning,
as in the service (``--no-fallback`` fails instead). ``--precision int8`` calibrates the int8 graph on
images spread over those given the first time; later runs load it from the cache, as fp32's graph is, with
no PyTorch model built and no PyTorch imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ml.bulk import embed_sources
from ml.embedder import CALIBRATION_IMAGES, Embedder, load_embedder
from ml.images import DEFAULT_ALLOWED_FORMATS, ImageDecodeError, decode_image
from ml.precision import PRECISIONS
from ml.preprocessing import PREPROCESS_MODES
from ml.weights import BACKBONES, WeightsError

EXIT_USAGE = 2
PROGRESS_INTERVAL_S = 2.0


class UsageError(Exception):
    """A mistake in what the user asked for; the message says which."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.command(args)
    except (UsageError, WeightsError, ImageDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ml", description="Visual search embedder.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    embed = commands.add_parser("embed", help="embed every image in files and folders")
    embed.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders (recursive)")
    embed.add_argument("--out", required=True, type=Path, help="where to write the vectors (.npy)")
    embed.add_argument("--batch", type=_positive_int, help="images per forward pass (default: 8 on CPU, 64 on GPU)")
    embed.add_argument("--workers", type=_positive_int, help="decoding threads (default: CPUs, at most 4)")
    _add_model_arguments(embed)
    embed.set_defaults(command=_embed)

    classify = commands.add_parser("classify", help="print the top-5 ImageNet labels of one image")
    classify.add_argument("file", type=Path, metavar="FILE")
    _add_model_arguments(classify)
    classify.set_defaults(command=_classify)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", choices=BACKBONES, default="resnet50")
    parser.add_argument(
        "--weights", default="imagenet", help="imagenet (default), random (tests, benchmarks) or a checkpoint file"
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--preprocess", choices=PREPROCESS_MODES, default="auto")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--no-fallback",
        dest="fallback",
        action="store_false",
        help="fail when the resnet50 ImageNet weights are unavailable, instead of using efficientnet_lite0 "
        "with a warning (as the service does)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _load(args: argparse.Namespace, files: list[Path] | None = None) -> Embedder:
    return load_embedder(
        args.backbone,
        args.weights,
        device=args.device,
        precision=args.precision,
        fallback=args.fallback,
        preprocess=args.preprocess,
        calibration=(lambda: _calibration_images(files)) if files else None,
    )


def _calibration_images(files: list[Path]):
    """What int8 is calibrated on when its graph is not cached yet: images spread over the ones to embed."""
    step = max(1, len(files) // CALIBRATION_IMAGES)
    for path in files[::step]:
        try:
            yield decode_image(path.read_bytes())[0]
        except (ImageDecodeError, OSError):
            continue


def _embed(args: argparse.Namespace) -> int:
    files = _image_files(args.paths)
    if args.out.suffix != ".npy":
        raise UsageError(f"--out must name a .npy file, got {args.out}")
    paths_file = args.out.with_suffix(".paths.txt")
    embedder = _load(args, files)
    progress = _Progress(total=len(files))
    result = embed_sources(
        embedder,
        files,
        read=Path.read_bytes,
        batch_size=args.batch,
        workers=args.workers,
        on_progress=progress.update,
    )
    progress.finish(len(result.sources), len(result.failures))
    for path, reason in result.failures:
        print(f"failed: {path}: {reason}", file=sys.stderr)

    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, result.vectors)
        paths_file.write_text("".join(f"{path}\n" for path in result.sources))
    except OSError as e:
        raise UsageError(f"cannot write the results next to {args.out}: {e.strerror or e}") from e
    summary = {
        "images": len(result.sources),
        "failed": len(result.failures),
        "seconds": round(result.seconds, 3),
        "images_per_s": round(result.images_per_s, 2),
        "backbone": embedder.backbone,
        "dim": embedder.dim,
        "identity": embedder.identity.key,
        "weights_sha256": embedder.identity.weights_sha256,
        "precision": embedder.precision,
        "engine": embedder.engine,
        "preprocess": embedder.preprocess_mode,
        "device": str(embedder.device),
        "batch": args.batch or embedder.batch_size,
        "fallback_reason": embedder.fallback_reason,
        "out": str(args.out),
        "paths": str(paths_file),
    }
    print(json.dumps(summary))
    return 0


def _image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files under the folders named, in a stable order.

    In folders, a file counts as an image by its extension (so descriptions and sounds
    beside the pictures are not reported as failures); a file named explicitly is always tried.
    """
    extensions = _image_extensions()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    file
                    for file in path.rglob("*")
                    if file.suffix.lower() in extensions
                    and file.is_file()
                    and not any(part.startswith(".") for part in file.relative_to(path).parts)
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path} is neither a file nor a folder")
    if not files:
        raise UsageError(f"no image files found in {' '.join(str(path) for path in paths)}")
    return files


def _image_extensions() -> frozenset[str]:
    """The file extensions of the formats decode_image accepts, as Pillow registers them."""
    return frozenset(
        extension
        for extension, image_format in Image.registered_extensions().items()
        if image_format in DEFAULT_ALLOWED_FORMATS
    )


class _Progress:
    """Progress on stderr: one updating line on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.started = time.perf_counter()
        self.last_shown = self.started
        self.interactive = sys.stderr.isatty()

    def update(self, done: int, failed: int) -> None:
        now = time.perf_counter()
        if now - self.last_shown < (0.2 if self.interactive else PROGRESS_INTERVAL_S):
            return
        self.last_shown = now
        self._show(done, failed, now)

    def finish(self, done: int, failed: int) -> None:
        self._show(done, failed, time.perf_counter())
        if self.interactive:
            print(file=sys.stderr)

    def _show(self, done: int, failed: int, now: float) -> None:
        rate = done / (now - self.started) if now > self.started else 0.0
        line = f"embedded {done}/{self.total} images, {failed} failed, {rate:.1f} images/s"
        if self.interactive:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _classify(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {args.file}: {e.strerror or e}") from e
    try:
        image, _ = decode_image(data)
    except ImageDecodeError as e:
        raise UsageError(f"{args.file}: {e}") from e
    embedder = _load(args, [args.file])
    for label, probability in embedder.embed([image]).labels[0]:
        print(f"{probability:.3f}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
