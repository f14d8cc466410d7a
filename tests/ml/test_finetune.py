"""Fine-tuning: a real short run of the offline backbone, resuming after kill -9, and the held-apart augmentations."""
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ml.augment import EVALUATION_FAMILIES, TRAINING_FAMILIES, shopper_photo, training_view
from ml.backbones import build_with_weights
from ml.embedder import load_embedder
from ml.finetune import FinetuneConfig, TrainingImage, finetune, write_mix
from tests.ml.photos import crops

TINY = FinetuneConfig(epochs=2, products_per_batch=4, image_size=64)


def catalog(count: int = 12) -> list[TrainingImage]:
    images = crops(count, seed=3)
    return [TrainingImage(product=i, category=i % 3, load=(lambda image=image: image)) for i, image in enumerate(images)]


def test_training_and_evaluation_transformations_are_disjoint_families():
    assert not TRAINING_FAMILIES & EVALUATION_FAMILIES
    rng = np.random.default_rng(0)
    image = crops(1)[0]
    for _ in range(20):
        _, used = training_view(image, rng)
        assert set(used) <= TRAINING_FAMILIES
        _, used = shopper_photo(image, rng, [image.rotate(90)])
        assert set(used) <= EVALUATION_FAMILIES and len(used) == 3


def test_some_training_views_zoom_out_onto_white_like_a_product_shot():
    rng = np.random.default_rng(1)
    image = Image.new("RGB", (120, 80), (128, 128, 128))  # grey: crops, mirrors and saturation keep its colour
    views = [np.asarray(training_view(image, rng)[0]) for _ in range(40)]
    zoomed = [view for view in views if (view == 255).all(axis=2).any()]
    assert 10 <= len(zoomed) <= 35, "zoomed out sometimes, not always"
    for view in zoomed:
        assert view.shape[0] == view.shape[1]
        product = (view == 128).all(axis=2)
        assert (product | (view == 255).all(axis=2)).all(), "the product on white, nothing else"
        assert 0 < product.mean() < 1.0, "smaller in the frame"


def test_a_short_fine_tune_of_the_offline_backbone_gives_a_loadable_checkpoint_with_new_vectors(tmp_path):
    images = catalog(24)
    history = finetune(backbone="efficientnet_lite0", weights="imagenet", images=images, out=tmp_path / "w.pth",
                       config=FinetuneConfig(epochs=1, products_per_batch=8))
    assert len(history["epochs"]) == 1 and np.isfinite(history["epochs"][0]["loss"])
    tuned, base = load_embedder("efficientnet_lite0", str(tmp_path / "w.pth")), load_embedder("efficientnet_lite0")
    assert tuned.identity != base.identity and tuned.dim == base.dim
    pictures = [image.load() for image in images[:4]]
    cosines = np.sum(tuned.embed(pictures).vectors * base.embed(pictures).vectors, axis=1)
    assert (cosines < 0.9999).all() and (cosines > 0.5).all(), "trained, not destroyed"
    assert tuned.embed(pictures[:1]).labels[0][0][1] > 0  # the ImageNet classifier is still there


def test_zero_epochs_keeps_the_weights_as_they_were(tmp_path):
    finetune(backbone="efficientnet_lite0", weights="random", images=catalog(4), out=tmp_path / "w.pth",
             config=FinetuneConfig(epochs=0))
    saved = torch.load(tmp_path / "w.pth", weights_only=True)
    original = load_embedder("efficientnet_lite0", "random", engine="torch")._model.trunk
    assert "classifier.weight" in saved and "conv_stem.weight" in saved
    assert saved["blocks.6.0.conv_pw.weight"].shape == dict(original.named_parameters())[
        "blocks.6.0.conv_pw.weight"].shape


def test_the_checkpoint_is_the_stated_mix_of_the_fine_tuned_and_the_starting_weights(tmp_path):
    """WiSE-FT: with interpolation 0.5, each trained weight lies halfway between start and fine-tuned."""
    for share in (1.0, 0.5):
        torch.manual_seed(0)  # the same dropout in both trainings, so they take the same steps
        finetune(backbone="efficientnet_lite0", weights="random", images=catalog(8), out=tmp_path / f"{share}.pth",
                 config=FinetuneConfig(epochs=1, products_per_batch=4, image_size=64, interpolation=share))
    alone, mixed = (torch.load(tmp_path / f"{share}.pth", weights_only=True) for share in (1.0, 0.5))
    start = build_with_weights("efficientnet_lite0", "random")[0].state_dict()
    name = "blocks.6.0.conv_pw.weight"  # a trained stage (the first four stay frozen)
    assert not torch.allclose(alone[name], start[name]), "the weights moved"
    assert torch.allclose(mixed[name], (alone[name] + start[name]) / 2, atol=1e-5)
    assert torch.equal(mixed["conv_stem.weight"], start["conv_stem.weight"])  # frozen: the same in all three


def test_a_mix_written_afterwards_equals_the_mix_trained_for(tmp_path):
    """The service tries several mixes of one training: ``write_mix`` from the unmixed weights gives what a
    training for that share would have written."""
    torch.manual_seed(0)
    finetune(backbone="efficientnet_lite0", weights="random", images=catalog(8), out=tmp_path / "trained.pth",
             config=FinetuneConfig(epochs=1, products_per_batch=4, image_size=64, interpolation=0.25),
             finetuned_out=tmp_path / "finetuned.pth")
    write_mix(backbone="efficientnet_lite0", weights="random", finetuned=tmp_path / "finetuned.pth", share=0.25,
              out=tmp_path / "mixed.pth")
    trained, mixed = (torch.load(tmp_path / name, weights_only=True) for name in ("trained.pth", "mixed.pth"))
    assert trained.keys() == mixed.keys()
    for name in trained:
        assert torch.allclose(trained[name].float(), mixed[name].float(), atol=1e-6), name


def test_a_training_killed_after_its_first_epoch_resumes_from_it(tmp_path):
    state = tmp_path / "state.pt"

    def train(on_progress=None):
        return finetune(backbone="efficientnet_lite0", weights="random", images=catalog(), out=tmp_path / "w.pth",
                        config=TINY, state_path=state, on_progress=on_progress)

    def die_in_epoch_two(progress):
        if progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() from a process with threads
        pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            train(die_in_epoch_two)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert state.is_file() and not (tmp_path / "w.pth").exists()

    history = train()
    assert [epoch["epoch"] for epoch in history["epochs"]] == [1, 2]  # epoch 1 came from the saved state
    assert load_embedder("efficientnet_lite0", str(tmp_path / "w.pth")).dim == 1280


def test_fewer_than_two_products_cannot_be_fine_tuned(tmp_path):
    with pytest.raises(ValueError, match="at least 2 products"):
        finetune(backbone="efficientnet_lite0", weights="random", images=catalog(1), out=tmp_path / "w.pth",
                 config=TINY)


def test_a_shopper_photo_on_clutter_keeps_the_product_visible():
    product = Image.new("RGB", (100, 100), "white")
    product.paste((200, 0, 0), (30, 30, 70, 70))
    photo, used = shopper_photo(product, np.random.default_rng(1), [Image.new("RGB", (300, 300), (0, 90, 0))],
                                families=6)
    assert "clutter" in used
    pixels = np.asarray(photo)
    reddish = (pixels[..., 0] > 100) & (pixels[..., 1] < 90)
    assert 0.01 < reddish.mean() < 0.5, "the product is there, on a larger scene"
