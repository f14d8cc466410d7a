"""The backbones: how each is built, its classifier split off for one-pass embedding, batch norms folded."""

from __future__ import annotations

import math
from functools import cache

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import ResNet50_Weights, resnet50

from ml.preprocessing import EvalPreset, resample_named
from ml.weights import load_state_dict, read_checkpoint, state_dict_sha256, weights_sha256

RESNET50_WEIGHTS = ResNet50_Weights.IMAGENET1K_V2


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in the order of every ImageNet classifier's outputs."""
    return tuple(RESNET50_WEIGHTS.meta["categories"])


class ClassifierEmbedder(nn.Module):
    """The backbone with its classifier split off: one pass returns the pooled features (the search vector
    before normalisation), the ImageNet logits, and the spatial feature maps they were pooled from (what
    localises objects and explains matches)."""

    def __init__(self, trunk: nn.Module, classifier: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps = self.maps(x).float()
        pooled = maps.mean(dim=(2, 3))  # both backbones pool by averaging
        # Labels stay fp32 under autocast: the head is cheap, and bf16 logits tie close classes.
        with torch.autocast(x.device.type, enabled=False):
            return pooled, self.classifier(pooled), maps

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        if hasattr(trunk, "forward_features"):  # timm
            return trunk.forward_features(x)
        # torchvision's ResNet, up to its average pool (attributes read here: folding replaces layers)
        x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
        return trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))




def _build_resnet50() -> tuple[nn.Module, EvalPreset]:
    transform = RESNET50_WEIGHTS.transforms()
    return resnet50(weights=None), EvalPreset(
        resize_size=transform.resize_size[0],
        crop_size=transform.crop_size[0],
        resample=resample_named(transform.interpolation.value),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _build_efficientnet_lite0() -> tuple[nn.Module, EvalPreset]:
    # The packaged weights are Google's TensorFlow EfficientNet-Lite0, so they run in timm's
    # TF-compatible variant ("same" padding, mean = std = 0.5); timm's efficientnet_lite0 takes
    # the same keys but pads like PyTorch, and finds same-category neighbours less well
    # (docs/preprocessing.md).
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    crop_size = config["input_size"][-1]
    return model, EvalPreset(
        resize_size=math.floor(crop_size / config["crop_pct"]),  # as timm's eval transform
        crop_size=crop_size,
        resample=resample_named(config["interpolation"]),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


BUILDERS = {"resnet50": _build_resnet50, "efficientnet_lite0": _build_efficientnet_lite0}


def build_with_weights(backbone: str, weights) -> tuple[nn.Module, EvalPreset, str]:
    """The backbone with ``weights`` ("imagenet", "random": seeded, or a checkpoint path), its eval preset,
    and the sha256 that identifies the weights."""
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights are the same on every load, and so is the identity
            model, preset = BUILDERS[backbone]()
        return model, preset, state_dict_sha256(model.state_dict())
    path, sha256 = weights_sha256(backbone, weights)
    model, preset = BUILDERS[backbone]()
    load_state_dict(model, read_checkpoint(path), backbone, path)
    return model, preset, sha256


def split_classifier(model: nn.Module) -> tuple[ClassifierEmbedder, int]:
    """Detach the ImageNet classifier so the model returns pooled features; returns (model, dim)."""
    if hasattr(model, "fc"):  # torchvision ResNet
        classifier, model.fc = model.fc, nn.Identity()
    else:  # timm EfficientNet: forward_head pools, then applies the classifier
        classifier, model.classifier = model.classifier, nn.Identity()
    return ClassifierEmbedder(model, classifier), classifier.in_features


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode batch norm into the convolution before it, in place; returns ``model``.

    The same function with one layer less per convolution: faster, and under bf16 the shift is
    added inside the convolution's fp32 accumulator instead of after rounding (a cancellation
    that moved some EfficientNet vectors noticeably: docs/preprocessing.md). A timm ``BatchNormAct2d`` leaves
    its activation behind. Children are visited in definition order, which is their forward order
    in torchvision's ResNet and timm's EfficientNet.
    """
    for parent in list(model.modules()):
        previous_name, previous = None, None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Identity):  # timm's placeholders (anti-aliasing, SE off) sit between
                continue
            if isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d) and not child.training:
                setattr(parent, previous_name, fuse_conv_bn_eval(previous, child))
                rest = [getattr(child, part) for part in ("drop", "act") if hasattr(child, part)]
                setattr(parent, name, nn.Sequential(*(m for m in rest if not isinstance(m, nn.Identity))))
                previous_name, previous = None, None
                continue
            previous_name, previous = name, child
    return model
