"""Fine-tuning the classifier-embedder on a catalog: instance-level metric learning and category supervision.

Each step takes ``products_per_batch`` products and two training views of each (``ml.augment``). Views of
one product are positives and every other view a negative (a supervised-contrastive loss, on a temporary
projection of the search vectors so that they keep more than the loss asks of them); products with a
category add a cross-entropy loss through a temporary linear head. Early stages stay frozen, and every
batch norm keeps its ImageNet statistics (batches of a few dozen images would only add noise to them).
The ImageNet classifier is put back unchanged, so the checkpoint loads like any weights file and one pass
still gives labels.

On CUDA: AMP (fp16 autocast with a gradient scaler) and channels_last. The state after each epoch is
saved, so a training whose worker died resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.augment import training_view
from ml.backbones import build_with_weights
from ml.precision import configure_cpu_threads


@dataclass(frozen=True)
class TrainingImage:
    product: int
    category: int | None  # None: the product's category is unknown, or held out from training
    load: Callable[[], Image.Image]  # the decoded RGB image


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 6
    products_per_batch: int = 16  # two views each
    learning_rate: float = 2e-4  # the unfrozen stages
    head_learning_rate: float = 2e-3  # the temporary category head
    weight_decay: float = 1e-4
    temperature: float = 0.1
    category_weight: float = 0.5
    projection: int = 256  # the contrastive loss on a temporary MLP projection this wide; 0: on the vectors
    frozen_stages: int = 4  # EfficientNet blocks (of 7) or ResNet layers (of 4) kept as ImageNet left them
    image_size: int = 224
    seed: int = 0
    # The checkpoint is this mix of the fine-tuned weights and the ones it started from (WiSE-FT, Wortsman
    # et al. 2022): 1.0 is the fine-tuned model alone. Mixing keeps the starting model's robustness to
    # photos unlike the training views, which a small catalog's few epochs otherwise wear away.
    interpolation: float = 0.5
    # Where the service chooses the mix itself (catalog/finetuning.py): these shares are each measured on
    # shopper-like photos other than the evaluation's, and the best one is kept; empty: ``interpolation``.
    mix_choices: tuple[float, ...] = (0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mix_choices", tuple(float(share) for share in self.mix_choices))  # JSON: a list
        for share in (self.interpolation, *self.mix_choices):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"a mix of fine-tuned weights is a share from 0 to 1, got {share}")


def default_config(backbone: str, device: str | torch.device, epochs: int | None = None) -> FinetuneConfig:
    """The recipe's settings for a device: fewer epochs and more frozen stages on a CPU (docs/finetuning.md)."""
    if torch.device(device).type == "cuda":
        config = FinetuneConfig(epochs=12, products_per_batch=64, frozen_stages=2 if backbone == "resnet50" else 2)
    else:
        config = FinetuneConfig(epochs=6, products_per_batch=16, frozen_stages=2 if backbone == "resnet50" else 4)
    return config if epochs is None else dataclasses.replace(config, epochs=epochs)


@dataclass(frozen=True)
class Progress:
    epoch: int  # 1-based
    epochs: int
    step: int  # within the epoch
    steps: int
    loss: float
    images_per_s: float
    seconds_left: float


def finetune(*, backbone: str, weights, images: list[TrainingImage], out: Path, config: FinetuneConfig,
             device: str | torch.device | None = None, state_path: Path | None = None,
             on_progress: Callable[[Progress], None] | None = None, finetuned_out: Path | None = None) -> dict:
    """Fine-tune ``backbone`` from ``weights`` on ``images`` and write the checkpoint to ``out``.

    Returns the history ({"epochs": [{"epoch", "loss", "images_per_s", "seconds"}], "categories"}). With
    ``state_path``, the state after each epoch is kept there and a later call resumes from it. With
    ``finetuned_out``, the fine-tuned weights before any mix are written there too (for ``write_mix``).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        configure_cpu_threads()
    if config.epochs < 0:
        raise ValueError(f"epochs must be 0 or more, got {config.epochs}")
    products = sorted({image.product for image in images})
    if len(products) < 2 and config.epochs:
        raise ValueError(f"fine-tuning needs at least 2 products with images, got {len(products)}")
    model, preset, _ = build_with_weights(backbone, weights)
    classifier_name = "fc" if hasattr(model, "fc") else "classifier"
    classifier = getattr(model, classifier_name)
    setattr(model, classifier_name, nn.Identity())
    _freeze(model, backbone, config.frozen_stages)
    categories = sorted({image.category for image in images if image.category is not None})
    head = nn.Linear(classifier.in_features, max(1, len(categories)))
    projection = (nn.Sequential(nn.Linear(classifier.in_features, classifier.in_features), nn.ReLU(),
                                nn.Linear(classifier.in_features, config.projection))
                  if config.projection else nn.Identity())
    model.to(device)
    head.to(device)
    projection.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    by_product: dict[int, list[TrainingImage]] = {}
    for image in images:
        by_product.setdefault(image.product, []).append(image)
    category_index = {c: i for i, c in enumerate(categories)}
    steps_per_epoch = max(1, math.ceil(len(products) / config.products_per_batch))
    total_steps = steps_per_epoch * config.epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": trainable, "lr": config.learning_rate},
        {"params": [*head.parameters(), *projection.parameters()], "lr": config.head_learning_rate},
    ], weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    mean = torch.tensor(preset.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preset.std, device=device).view(1, 3, 1, 1) * 255
    size_preset = dataclasses.replace(preset, crop_size=config.image_size, resize_size=config.image_size, mode="pad")

    history, start_epoch = {"epochs": [], "categories": len(categories), "products": len(products)}, 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        projection.load_state_dict(state["projection"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, start_epoch = state["history"], state["epoch"]

    cache: dict[int, Image.Image] = {}

    def view_pixels(image: TrainingImage, rng: np.random.Generator) -> np.ndarray:
        key = id(image)
        if key not in cache:
            loaded = image.load().convert("RGB")
            loaded.thumbnail((2 * config.image_size, 2 * config.image_size))  # views crop and shrink anyway
            cache[key] = loaded
        view, _ = training_view(cache[key], rng)
        return size_preset.pixels(view)

    seconds_seen, images_seen = 0.0, 0
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="views") as pool:
        for epoch in range(start_epoch, config.epochs):
            rng = np.random.default_rng(config.seed + epoch)
            order = rng.permutation(products)
            started, losses = time.perf_counter(), []
            model.train()
            _keep_batch_norms_frozen(model)
            for step in range(steps_per_epoch):
                batch = order[step * config.products_per_batch:(step + 1) * config.products_per_batch]
                if len(batch) < 2:
                    continue
                picked = [by_product[p][int(rng.integers(len(by_product[p])))] for p in batch]
                seeds = rng.integers(2**31, size=2 * len(picked))
                jobs = [(image, np.random.default_rng(int(seed))) for image, seed in zip(picked + picked, seeds)]
                pixels = np.stack(list(pool.map(lambda job: view_pixels(*job), jobs)))
                labels = torch.tensor(list(range(len(picked))) * 2, device=device)
                category_of = [category_index.get(image.category, -1) for image in picked] * 2
                step_started = time.perf_counter()
                loss = _step(model, head, projection, optimizer, scaler, torch.from_numpy(pixels).to(device), mean, std,
                             labels, torch.tensor(category_of, device=device), config, device)
                schedule.step()
                losses.append(loss)
                seconds_seen += time.perf_counter() - step_started
                images_seen += len(jobs)
                if on_progress:
                    rate = images_seen / max(seconds_seen, 1e-9)
                    remaining = (config.epochs - epoch - 1) * steps_per_epoch + steps_per_epoch - step - 1
                    on_progress(Progress(epoch + 1, config.epochs, step + 1, steps_per_epoch, float(np.mean(losses)),
                                         rate, remaining * 2 * config.products_per_batch / max(rate, 1e-9)))
            history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                                      "images_per_s": images_seen / max(seconds_seen, 1e-9),
                                      "seconds": time.perf_counter() - started})
            if state_path is not None:
                _save_atomically({"model": model.state_dict(), "head": head.state_dict(),
                                  "projection": projection.state_dict(),
                                  "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                  "history": history, "epoch": epoch + 1}, state_path)

    setattr(model, classifier_name, classifier.to(device))
    if finetuned_out is not None:
        _save_atomically(_cpu_state(model), finetuned_out)
    if config.interpolation < 1.0:
        _interpolate(model, build_with_weights(backbone, weights)[0].state_dict(), config.interpolation)
    _save_atomically(_cpu_state(model), out)
    return history


def write_mix(*, backbone: str, weights, finetuned: Path, share: float, out: Path) -> None:
    """Write the checkpoint that is ``share`` of the ``finetuned`` weights and ``1 - share`` of the ``weights``
    they started from (WiSE-FT), without training again."""
    model = build_with_weights(backbone, weights)[0]
    started = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}  # not views of it
    model.load_state_dict(torch.load(finetuned, map_location="cpu", weights_only=True))
    _interpolate(model, started, share)
    _save_atomically(_cpu_state(model), out)


def _cpu_state(model: nn.Module) -> dict:
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}


def _step(model, head, projection, optimizer, scaler, pixels, mean, std, labels, categories, config, device) -> float:
    if device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    pixels = (pixels.float() - mean) / std
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        pooled = model(pixels).float()
    vectors = nn.functional.normalize(projection(pooled), dim=1)
    loss = _contrastive(vectors, labels, config.temperature)
    known = categories >= 0
    if known.any() and config.category_weight:
        logits = head(pooled[known])
        loss = loss + config.category_weight * nn.functional.cross_entropy(logits, categories[known],
                                                                          label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _contrastive(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: each view against the other views of its product, every other view a negative."""
    similarity = vectors @ vectors.T / temperature
    self_mask = torch.eye(len(vectors), dtype=torch.bool, device=vectors.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_probability = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    return -(log_probability.masked_fill(~positives, 0).sum(1) / positives.sum(1).clamp(min=1)).mean()


def _freeze(model: nn.Module, backbone: str, stages: int) -> None:
    """Keep the stem and the first ``stages`` stages as they are."""
    if backbone == "resnet50":
        frozen = [model.conv1, model.bn1, *[getattr(model, f"layer{i}") for i in range(1, stages + 1)]]
    else:
        frozen = [model.conv_stem, model.bn1, *list(model.blocks)[:stages]]
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad = False


@torch.no_grad()
def _interpolate(model: nn.Module, started: dict, share: float) -> None:
    """``model`` becomes ``share`` of itself plus ``1 - share`` of the ``started`` state (same architecture), in place."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.mul_(share).add_(started[name].to(tensor.device, tensor.dtype), alpha=1.0 - share)


def _keep_batch_norms_frozen(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _warmup_cosine(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _save_atomically(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, partial)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    partial.replace(path)
