"""Tests for ml.images: every input decodes to RGB or is refused with a reason."""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ml.images import ImageDecodeError, ImageInfo, decode_image, inspect_image

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "images"

CORPUS_HANG_S = 600  # a walk that takes longer has hung (speed is measured in benchmarks/, not here)
CORPUS_MEMORY_CAP = 4 * 1024**3  # address space for the whole walk; a bomb hits this, not the machine
CORPUS_PEAK_RSS_MB = 1024

WHITE = (255, 255, 255)
ACCEPTED = "accepted: AVIF, BMP, GIF, HEIF, JPEG, PNG, TIFF, WEBP"


def encode(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def corpus_file(name: str) -> bytes:
    path = CORPUS / name
    assert path.is_file(), f"corpus file {path} is missing; see {CORPUS.parent / 'README.md'}"
    return path.read_bytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# --- the whole corpus -------------------------------------------------------------


def decode_corpus(corpus: str) -> None:
    """Child-process side of the corpus walk: one JSON line per file on stdout.

    "start" is printed before each decode so a crash or hang names its file.
    """
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = CORPUS_MEMORY_CAP if hard == resource.RLIM_INFINITY else min(CORPUS_MEMORY_CAP, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    # A forked child inherits its parent's peak RSS (pytest may hold models); reset it to this process's own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for path in sorted(p for p in Path(corpus).rglob("*") if p.is_file()):
        name = str(path.relative_to(corpus))
        data = path.read_bytes()
        print(json.dumps({"start": name}), flush=True)
        try:
            image, info = decode_image(data)
            if image.mode != "RGB" or 0 in image.size:
                outcome = f"bad result: mode {image.mode}, size {image.size}"
            elif inspect_image(data) != info:
                outcome = "inspect_image disagrees with decode_image"
            else:
                outcome = "decoded"
        except ImageDecodeError as e:
            outcome = "refused" if str(e) else "refused without a reason"
        except BaseException as e:  # the point of the walk is to catch exactly these
            outcome = f"{type(e).__name__}: {e}"
        print(json.dumps({"file": name, "outcome": outcome}), flush=True)
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "load_truncated": ImageFile.LOAD_TRUNCATED_IMAGES}), flush=True)


def test_every_corpus_file_decodes_to_rgb_or_is_refused():
    assert CORPUS.is_dir(), (
        f"image corpus not found at {CORPUS}: the tests expect ../shared/corpus/images beside the clone"
    )
    # A child process, so a crash, hang or runaway allocation fails this test instead of the run.
    walk = "import sys; from tests.ml.test_images import decode_corpus; decode_corpus(sys.argv[1])"
    try:
        child = subprocess.run(
            [sys.executable, "-c", walk, str(CORPUS)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=CORPUS_HANG_S,
        )
        stdout, ended = child.stdout, f"exit status {child.returncode}"
    except subprocess.TimeoutExpired as e:
        # TimeoutExpired carries bytes even with text=True.
        stdout, ended = (e.stdout or b"").decode(errors="replace"), f"no end after {CORPUS_HANG_S} s"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    results = [line for line in lines if "file" in line]
    summary = next((line for line in lines if "peak_rss_mb" in line), None)
    if summary is None:
        last = next((line["start"] for line in reversed(lines) if "start" in line), None)
        pytest.fail(f"corpus walk ended early ({ended}) while decoding {last}")

    failures = [f"{r['file']}: {r['outcome']}" for r in results if r["outcome"] not in ("decoded", "refused")]
    decoded = sum(r["outcome"] == "decoded" for r in results)
    assert not failures, "\n".join(failures)
    assert len(results) >= 1000, f"only {len(results)} corpus files found in {CORPUS}"
    assert decoded > len(results) / 2, f"only {decoded} of {len(results)} files decoded"
    assert summary["peak_rss_mb"] < CORPUS_PEAK_RSS_MB
    assert summary["load_truncated"] is False


# --- refusals ---------------------------------------------------------------------


def test_empty_bytes_are_refused():
    with pytest.raises(ImageDecodeError, match="not an image: the data is empty"):
        decode_image(b"")


def test_random_bytes_are_not_an_image():
    noise = np.random.default_rng(0).bytes(10_000_000)
    with pytest.raises(ImageDecodeError, match="^not an image: the data matches no known image format"):
        decode_image(noise)


def test_svg_is_refused_by_name():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    with pytest.raises(ImageDecodeError, match=f"image format SVG is not accepted \\({ACCEPTED}\\)"):
        decode_image(svg)


def test_html_page_is_not_an_image():
    with pytest.raises(ImageDecodeError, match="not an image: the data is an HTML page"):
        decode_image(b"\n<!DOCTYPE html><html><body>404 Not Found</body></html>")


def test_html_behind_a_png_signature_is_refused():
    data = b"\x89PNG\r\n\x1a\n<html><body>not really a picture</body></html>"
    with pytest.raises(ImageDecodeError, match="^image file is truncated or corrupt: "):
        decode_image(data)


def test_pcx_is_refused_with_its_format_named():
    pcx = encode(Image.new("RGB", (8, 8), "red"), "PCX")
    expected = f"image format PCX is not accepted ({ACCEPTED})"
    with pytest.raises(ImageDecodeError) as refused:
        decode_image(pcx)
    assert str(refused.value) == expected
    with pytest.raises(ImageDecodeError, match="image format PCX is not accepted"):
        inspect_image(corpus_file("01r_00.pcx"))


@pytest.mark.parametrize("name, refused_format", [("hopper.psd", "PSD"), ("test-card-lossless.jp2", "JPEG2000")])
def test_other_formats_from_the_corpus_are_refused_by_name(name, refused_format):
    with pytest.raises(ImageDecodeError, match=f"image format {refused_format} is not accepted"):
        decode_image(corpus_file(name))


def test_caller_can_narrow_the_accepted_formats():
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"image format PNG is not accepted \(accepted: JPEG\)"):
        decode_image(png, allowed_formats=frozenset({"JPEG"}))


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_file_is_refused(image_format):
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), image_format)
    with pytest.raises(ImageDecodeError, match="^image file is truncated or corrupt: "):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="^image file is truncated or corrupt: "):
        inspect_image(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["truncated_jpeg.jpg", "truncated_image.png"])
def test_truncated_corpus_files_are_refused(name):
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(corpus_file(name))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_header_claiming_a_huge_size_is_refused_before_decoding():
    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )
    # 7.5 GB of RGB if it were decoded: only the header check can answer this quickly.
    with pytest.raises(ImageDecodeError) as refused:
        decode_image(data)
    assert str(refused.value) == "image is 50000x50000 = 2500.0 megapixels, over the 600.0 megapixel limit"


def test_a_header_claiming_far_more_pixels_than_its_bytes_could_hold_is_a_bomb():
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 MP, under the cap, in a 1 KB file
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + png_chunk(b"IEND", b""))
    with pytest.raises(ImageDecodeError, match=r"pixels per byte, over 1000\): a decompression bomb"):
        decode_image(data)


def master_child(kind: str) -> None:
    """Child-process side: make a large master, decode it as the pipeline does, print size and peak memory."""
    if kind == "png":  # a print-resolution master of flat artwork: 10,500 x 16,000, about 1 MB as PNG
        art = Image.new("L", (10_500, 16_000), 255)
        from PIL import ImageDraw

        draw = ImageDraw.Draw(art)
        for i in range(30):
            draw.ellipse((300 * i, 500 * i, 300 * i + 3000, 500 * i + 2500), fill=40 + 6 * i)
        data = encode(art.convert("RGB"), "PNG")
    else:  # a 45-megapixel camera JPEG
        rng = np.random.default_rng(0)
        data = encode(Image.fromarray(rng.integers(0, 255, (550, 820, 3), dtype=np.uint8)).resize((8200, 5500)),
                      "JPEG", quality=90)
        art = None
    del art
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmRSS:")))
    image, info = decode_image(data, min_side=256)
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:")))
    print(json.dumps({"full": [info.width, info.height], "decoded": list(image.size), "mode": image.mode,
                      "peak_mb": (peak - before) / 1024}))


@pytest.mark.parametrize("kind,full", [("png", [10_500, 16_000]), ("jpeg", [8200, 5500])])
def test_large_masters_are_decoded_shrunk_in_bounded_memory(kind, full):
    child = subprocess.run([sys.executable, "-c", f"from tests.ml.test_images import master_child; master_child({kind!r})"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["full"] == full and result["mode"] == "RGB"
    assert min(result["decoded"]) >= 256 and max(result["decoded"]) <= 2048, result  # what the model needs
    assert result["peak_mb"] < 300, result


def test_pixel_cap_is_the_callers_to_set():
    png = encode(Image.new("L", (2000, 1500)), "PNG")
    assert inspect_image(png, max_pixels=3_000_000) == ImageInfo("PNG", 2000, 1500)
    with pytest.raises(ImageDecodeError, match=r"image is 2000x1500 = 3\.0 megapixels, over the 2\.0 megapixel limit"):
        inspect_image(png, max_pixels=2_000_000)


@pytest.mark.parametrize("name", ["decompression_bomb.gif", "decompression_bomb_extents.gif"])
def test_gif_decompression_bombs_are_refused(name):
    with pytest.raises(ImageDecodeError, match="too large|megapixel limit"):
        decode_image(corpus_file(name))


def test_tiff_with_an_oversized_later_page_is_refused():
    pages = [Image.new("L", (10, 10)), Image.new("L", (2000, 2000))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert inspect_image(data) == ImageInfo("TIFF", 10, 10)
    with pytest.raises(ImageDecodeError, match=r"image page 2 is 2000x2000 = 4\.0 megapixels, over the 1\.0 megapixel"):
        inspect_image(data, max_pixels=1_000_000)


# --- what comes out ---------------------------------------------------------------


def test_exif_orientation_rotates_the_image():
    stored = Image.new("RGB", (60, 30), "blue")
    stored.paste((255, 0, 0), (0, 0, 30, 30))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    image, info = decode_image(data)

    assert image.size == (30, 60)
    assert info == ImageInfo("JPEG", 30, 60)
    red, green, blue = image.getpixel((15, 10))
    assert red > 200 and blue < 50, "the stored left edge must end up on top"


@pytest.mark.parametrize("orientation", range(2, 9))
def test_corpus_orientations_all_come_out_upright(orientation):
    upright = np.asarray(decode_image(corpus_file("hopper.jpg"))[0], dtype=np.int16)
    image, _ = decode_image(corpus_file(f"hopper_orientation_{orientation}.jpg"))
    # Unrotated, these differ from the upright original by 60-80 levels on average.
    assert np.abs(np.asarray(image, dtype=np.int16) - upright).mean() < 10


def test_transparent_rgba_pixel_becomes_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    image, _ = decode_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((1, 0)) == WHITE


def test_palette_transparency_becomes_white():
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255])  # index 0 black, index 1 blue
    palette_image.putpixel((1, 0), 1)
    image, _ = decode_image(encode(palette_image, "PNG", transparency=0))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 255)


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # magenta + yellow ink: red
    image, info = decode_image(encode(cmyk, "TIFF"))
    assert info == ImageInfo("TIFF", 4, 4)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_gradient_keeps_its_range():
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    image, _ = decode_image(encode(Image.fromarray(gradient), "PNG"))
    row = np.asarray(image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0), "brightness must rise left to right"
    assert len(np.unique(row)) > 200, "not clipped to white nor banded"


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    image, info = decode_image(data)
    assert info == ImageInfo("GIF", 16, 16)
    assert image.getpixel((8, 8)) == (255, 0, 0)


def test_large_jpeg_is_decoded_at_reduced_size_but_reports_its_full_size():
    stripes = np.zeros((3000, 4000, 3), dtype=np.uint8)
    stripes[:, ::50] = 255
    data = encode(Image.fromarray(stripes), "JPEG", quality=75)

    image, info = decode_image(data, min_side=256)

    assert info == ImageInfo("JPEG", 4000, 3000)
    assert image.size == (500, 375), "1/8 scale: the largest that keeps the short side >= 256"
    assert decode_image(data, min_side=3000)[0].size == (4000, 3000), "no reduction when none is possible"


def test_returned_image_is_loaded_rgb_for_every_accepted_format():
    source = Image.new("RGB", (12, 7), (10, 120, 230))
    for image_format in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        image, info = decode_image(encode(source, image_format))
        assert (image.mode, image.size, info) == ("RGB", (12, 7), ImageInfo(image_format, 12, 7))
        assert not getattr(image, "tile", None), "pixels must be in memory, not still to be read"


def test_inspect_at_reduced_size_still_refuses_a_truncated_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (2400, 1800), (200, 40, 40)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert inspect_image(data, min_side=256) == ImageInfo("JPEG", 2400, 1800)
    with pytest.raises(ImageDecodeError, match="truncated"):
        inspect_image(data[: len(data) * 9 // 10], min_side=256)
