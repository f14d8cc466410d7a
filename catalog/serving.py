"""What search serves: the model identity whose index is active, and the models that embed, once per process.

Each model identity has its own index directory under settings.INDEX_DIR; `active.json` there names
the one search serves, with the backbone and weights that embed queries comparably. The pipeline
switches it (`maybe_activate`) once a model's index holds every image; search and the categorizer
only read it.
"""
import json
import logging
import threading
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from catalog.models import ProductImage
from catalog.process_cache import ProcessCache, file_stamp
from catalog.selectors import stored_image
from ml.embedder import CALIBRATION_IMAGES
from ml.files import atomic_write
from ml.images import ImageDecodeError
from ml.precision import machine_kind

logger = logging.getLogger(__name__)
Status = ProductImage.Status

ACTIVE_FILE = "active.json"
PROMOTED_FILE = "promoted.json"  # a fine-tuned model promoted over the configured one (catalog/model_versions.py)
# identity -> machine kind -> the precision "auto" means there (catalog/precision_choice.py keeps the figures).
PRECISION_FILE = "precision.json"
AUTO_BATCH_WAIT_MS = 3  # how long a batch of queries gathers on CUDA when the settings leave it to "auto"

# The configured model and, during a switch, the one search still serves; and the precisions being compared.
_embedders: ProcessCache[tuple, object] = ProcessCache("embedders", size=4)


def configured() -> list[str]:
    """The model the settings name: [backbone, weights]."""
    return [settings.EMBED_BACKBONE, settings.EMBED_WEIGHTS]


def embedder_spec() -> dict:
    """The model new images are embedded with: the promoted fine-tuning while the settings are those it was
    promoted under, else the one the settings name."""
    promoted = promoted_model()
    if promoted is not None and promoted["configured"] == configured():
        return {"backbone": promoted["backbone"], "weights": promoted["weights"]}
    return {"backbone": settings.EMBED_BACKBONE, "weights": settings.EMBED_WEIGHTS}


def promoted_model() -> dict | None:
    """{"backbone", "weights", "identity", "configured", "version"} of the promoted model, or None."""
    try:
        return json.loads((Path(settings.INDEX_DIR) / PROMOTED_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_promoted(spec: dict | None) -> None:
    """Promote a model (``spec`` with "backbone", "weights", "identity", "version"), or go back to the
    configured one (None)."""
    path = Path(settings.INDEX_DIR) / PROMOTED_FILE
    if spec is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps({**spec, "configured": configured()}).encode()))


def get_embedder(spec: dict | None = None, *, precision: str | None = None):
    """The classifier-embedder for `spec` (default: the configured one), loaded once per process.

    ``precision`` defaults to the settings'; "auto" is what the catalog's evaluation chose for the model's
    identity on this machine kind (``chosen_precisions``), else fp32 on the CPU. Loading happens on first use,
    so a prefork worker loads it in each child, never in the parent; a checkpoint file rewritten in place, or
    a new precision choice, is loaded again.
    """
    from ml.embedder import load_embedder  # its engines import what they need, on first use

    spec = spec or embedder_spec()
    precision = precision or settings.EMBED_PRECISION
    key = (spec["backbone"], spec["weights"], precision, settings.EMBED_FALLBACK)
    stamp = (file_stamp(spec["weights"]) if spec["weights"] not in ("imagenet", "random") else None,
             file_stamp(Path(settings.INDEX_DIR) / PRECISION_FILE) if precision == "auto" else None)
    return _embedders.get(key, lambda: load_embedder(
        spec["backbone"], spec["weights"], precision=precision, fallback=settings.EMBED_FALLBACK,
        chosen_precision=lambda identity: chosen_precisions().get(identity, {}).get(machine_kind()),
        calibration=calibration_images,
    ), stamp=stamp)


_batchers_lock = threading.Lock()


def embed_query(model, images, *, maps: bool = False):
    """Query images embedded by ``model``, in one forward pass with the concurrent queries of this process that
    arrive within settings.QUERY_BATCH_WAIT_MS, at most QUERY_BATCH_IMAGES images. None ("auto"): batched on
    CUDA, each on its own on the CPU, where batching measured no faster (docs/decisions.md); 0: never."""
    wait_ms = settings.QUERY_BATCH_WAIT_MS
    if wait_ms is None:
        wait_ms = AUTO_BATCH_WAIT_MS if model.device.startswith("cuda") else 0
    if wait_ms <= 0:
        return model.embed(images, maps=maps)
    from ml.batcher import DynamicBatcher

    with _batchers_lock:  # kept on the model, so it goes when the model does
        if model.query_batcher is None:
            model.query_batcher = DynamicBatcher(model.embed_pixels, max_images=settings.QUERY_BATCH_IMAGES,
                                                 wait_s=wait_ms / 1000)
    return model.query_batcher.embed([model.preprocess(image) for image in images], maps=maps)


def chosen_precisions() -> dict:
    try:
        return json.loads((Path(settings.INDEX_DIR) / PRECISION_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def write_chosen_precision(identity: str, kind: str, precision: str) -> None:
    choices = chosen_precisions()
    choices.setdefault(identity, {})[kind] = precision
    path = Path(settings.INDEX_DIR) / PRECISION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(choices).encode()))


def calibration_images():
    """Images spread over the catalog, decoded: what an int8 graph is calibrated on when it is first made."""
    ids = list(ProductImage.objects.exclude(status=Status.FAILED).order_by("id").values_list("id", flat=True))
    chosen = ids[:: max(1, len(ids) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    for name in ProductImage.objects.filter(id__in=chosen).order_by("id").values_list("file", flat=True):
        try:
            yield stored_image(name)
        except (OSError, ImageDecodeError):
            continue


def served_model(model) -> dict:
    """What search needs to embed queries with `model`, and the configuration it was loaded under."""
    return {
        "identity": model.identity.key,
        "backbone": model.identity.backbone,
        # A fallback model is named as what it is, so search loads the same one.
        "weights": "imagenet" if model.fallback_reason else embedder_spec()["weights"],
        "configured": configured(),
    }


def active_index() -> dict | None:
    """{"identity", "backbone", "weights", "activated_at"} of the index search serves, or None."""
    try:
        return json.loads((Path(settings.INDEX_DIR) / ACTIVE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def query_embedder():
    """The model that embedded the index search serves, so query and catalog vectors are comparable."""
    active = active_index()
    return get_embedder({"backbone": active["backbone"], "weights": active["weights"]} if active else None)


def maybe_activate(model: dict) -> None:
    """Serve `model`'s index once it holds every image that can be embedded (or nothing serves yet).

    `model` is what `served_model` gave for the model that embedded the images just indexed.
    """
    identity = model["identity"]
    active = active_index()
    if active is not None and active["identity"] == identity:
        return
    if model["configured"] != configured():
        return  # a leftover batch of a model configured before: never switch back to it
    behind = ProductImage.objects.exclude(status=Status.FAILED).exclude(model_identity=identity, status=Status.INDEXED)
    if active is None or not behind.exists():
        activate(identity, {"backbone": model["backbone"], "weights": model["weights"]})


def activate(identity: str, spec: dict) -> None:
    """Serve the index of ``identity``, embedding queries with ``spec`` ({"backbone", "weights"})."""
    root = Path(settings.INDEX_DIR)
    root.mkdir(parents=True, exist_ok=True)
    data = {**spec, "identity": identity, "activated_at": timezone.now().isoformat(timespec="seconds")}
    atomic_write(root / ACTIVE_FILE, lambda f: f.write(json.dumps(data).encode()))
    logger.info("search now serves the index of %s", identity)
