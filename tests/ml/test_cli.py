"""Tests for ``python -m ml``: embed a folder, classify one image, and fail with a message, not a traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from ml import weights
from ml.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH: the project is run from its checkout, not installed.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "ml", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env
    )


@pytest.fixture
def chelsea_jpeg(tmp_path) -> Path:
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=90)
    return path


def test_classify_names_the_cat_in_a_photo(chelsea_jpeg):
    result = run_cli("classify", str(chelsea_jpeg), "--backbone", "efficientnet_lite0")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5
    probability, label = lines[0].split(maxsplit=1)
    assert label in CATS, result.stdout
    assert 0.3 < float(probability) <= 1.0


def test_embed_a_folder_writes_vectors_paths_and_a_json_summary(tmp_path):
    folder = tmp_path / "catalog"
    (folder / "mugs").mkdir(parents=True)
    Image.fromarray(data.coffee()).resize((120, 80)).save(folder / "mugs" / "coffee.png")
    Image.fromarray(data.chelsea()).resize((90, 60)).save(folder / "cat.jpg")
    Image.fromarray(data.astronaut()).resize((64, 64)).save(folder / "astronaut.webp")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (folder / "notes.txt").write_text("not an image, and not counted")
    out = tmp_path / "out" / "vectors.npy"

    result = run_cli(
        "embed", str(folder), "--out", str(out),
        "--backbone", "efficientnet_lite0", "--weights", "random", "--batch", "2",
    )

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["failed"] == 1
    assert summary["backbone"] == "efficientnet_lite0" and summary["dim"] == 1280
    assert summary["identity"].startswith("efficientnet_lite0:")
    assert summary["precision"] == ("fp16" if summary["device"].startswith("cuda") else "fp32")  # what auto means
    assert summary["seconds"] > 0 and summary["images_per_s"] > 0
    assert "broken.jpg" in result.stderr
    vectors = np.load(out)
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paths = (tmp_path / "out" / "vectors.paths.txt").read_text().splitlines()
    assert [Path(path).name for path in paths] == ["astronaut.webp", "cat.jpg", "coffee.png"]


def test_unavailable_resnet_weights_exit_2_saying_where_to_put_them(chelsea_jpeg, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "RESNET50_URL", "http://10.255.255.1/models/resnet50-11ad3fa6.pth")
    monkeypatch.setattr(weights, "DOWNLOAD_PROBE_TIMEOUT_S", 1.0)

    code = main(["classify", str(chelsea_jpeg), "--no-fallback"])

    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in err
    assert "Traceback" not in err


def test_unavailable_resnet_weights_fall_back_to_efficientnet_with_a_warning(chelsea_jpeg, tmp_path, monkeypatch,
                                                                          capsys, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "RESNET50_URL", "http://10.255.255.1/models/resnet50-11ad3fa6.pth")
    monkeypatch.setattr(weights, "DOWNLOAD_PROBE_TIMEOUT_S", 1.0)

    with caplog.at_level(logging.WARNING):
        code = main(["classify", str(chelsea_jpeg)])

    assert code == 0
    assert "efficientnet_lite0 backbone instead of resnet50" in caplog.text
    assert "cat" in capsys.readouterr().out.lower()


def test_missing_weights_file_exits_2(chelsea_jpeg, tmp_path, capsys):
    code = main(["classify", str(chelsea_jpeg), "--weights", str(tmp_path / "missing.pth")])

    assert code == 2
    err = capsys.readouterr().err
    assert "missing.pth does not exist" in err and "Traceback" not in err


def test_a_file_that_is_not_an_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "page.jpg"
    bad.write_text("<html><body>404</body></html>")

    code = main(["classify", str(bad), "--backbone", "efficientnet_lite0"])

    assert code == 2
    assert "HTML page" in capsys.readouterr().err


def test_embed_a_path_that_does_not_exist_exits_2(tmp_path, capsys):
    code = main(["embed", str(tmp_path / "nowhere"), "--out", str(tmp_path / "v.npy"), "--weights", "random"])

    assert code == 2
    assert "neither a file nor a folder" in capsys.readouterr().err


def test_embed_in_int8_calibrates_on_the_images_given_then_reuses_the_graph(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number, name in enumerate(("coffee", "chelsea", "astronaut", "rocket")):
        Image.fromarray(getattr(data, name)()).resize((160, 120)).save(folder / f"{number}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_HOME": str(tmp_path / "torch")}

    def embed(precision: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "ml", "embed", str(folder), "--out", str(tmp_path / f"{precision}.npy"),
                               "--backbone", "efficientnet_lite0", "--precision", precision],
                              capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    fp32, int8 = embed("fp32"), embed("int8")
    graphs = sorted(path.name.rsplit(".", 2)[-2] for path in (tmp_path / "torch" / "visualsearch-onnx").glob("*.onnx"))
    full, reduced = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "int8.npy")
    again = embed("int8")

    assert (fp32["engine"], int8["engine"], int8["precision"]) == ("onnxruntime", "onnxruntime", "int8")
    assert graphs == ["fp32", "int8"] and again["identity"] == int8["identity"] == fp32["identity"]
    assert np.mean(np.sum(full * reduced, axis=1)) > 0.85
    np.testing.assert_array_equal(np.load(tmp_path / "int8.npy"), reduced)  # the same graph, not a new calibration
