"""Which precision "auto" embeds with, for one model on one machine kind: the catalog's own evaluation decides.

fp32 and the candidates (int8 in ONNX Runtime, calibrated on the catalog's images; bf16 where the CPU computes it
natively) each embed the same sample of the catalog and the same shopper-like queries of the evaluation
(catalog/evaluation.py). The fastest candidate is chosen only when it is at least ``MIN_SPEEDUP`` times as fast here and, both on its own and
as queries against the fp32 vectors already in the index (what serving looks like right after the switch),
its search recall@1 and category top-1 are within half a point of fp32's. The
decision, with its figures, is stored on the model's row per machine kind (``ModelVersion.precision``, shown
in GET /api/models/{id}/) and in INDEX_DIR/precision.json, which every process's ``get_embedder`` reads.
Without such an evaluation "auto" stays fp32 (docs/decisions.md).
"""
import logging

import numpy as np
from django.conf import settings
from django.utils import timezone

from catalog.evaluation import (
    CatalogImages,
    catalog_images,
    catalog_sample,
    category_figures,
    embed_catalog,
    load_catalog_image,
    query_vectors,
)
from catalog.models import ModelVersion
from catalog.selectors import stored_image_bytes
from catalog.serving import get_embedder, write_chosen_precision
from ml.augment import cluttered_backgrounds
from ml.catalog_eval import CatalogVectors, query_plan, rank_products, search_metrics
from ml.precision import CPU_CANDIDATES, PrecisionUnavailableError, cpu_has_native_bf16, machine_kind

logger = logging.getLogger(__name__)

TOLERANCE = 0.005  # half a point of recall@1 or top-1
# A candidate must embed at least this much faster than fp32: a smaller gain is within the timing's noise on a
# shared machine (the same catalog embedded twice differs by up to 8 %) and not worth a mixed index.
MIN_SPEEDUP = 1.1
SAMPLE_PRODUCTS = 3000  # products whose images both precisions embed: enough for the figures, bounded in time


def precision_choose(*, version_id: int) -> dict | None:
    """Compare fp32 with the reduced precisions for one model on this machine kind, store and return the decision.

    None where there is nothing to choose: a precision set in the settings, or a GPU (where "auto" is fp16)."""
    version = ModelVersion.objects.get(pk=version_id)
    spec = {"backbone": version.backbone, "weights": version.weights}
    if settings.EMBED_PRECISION != "auto" or not get_embedder(spec, precision="fp32").device.startswith("cpu"):
        return None
    kind = machine_kind()
    _progress(version, "comparing precisions")
    decision = compare(version)
    decision["measured_at"] = timezone.now().isoformat(timespec="seconds")
    version.refresh_from_db()
    ModelVersion.objects.filter(pk=version.pk).update(precision={**version.precision, kind: decision},
                                                      progress={"stage": "evaluated"})
    write_chosen_precision(version.identity, kind, decision["chosen"])
    logger.info("model %s on %s: %s (%s)", version.pk, kind, decision["chosen"], decision["reason"])
    return decision


def candidates() -> tuple[str, ...]:
    """int8 everywhere ONNX Runtime runs; bf16 only where the CPU computes it natively (else it is slower)."""
    return tuple(name for name in CPU_CANDIDATES if name != "bf16" or cpu_has_native_bf16())


def compare(version: ModelVersion) -> dict:
    catalog = catalog_sample(catalog_images(), SAMPLE_PRODUCTS)
    plan = query_plan(list(zip(catalog.image_ids.tolist(), catalog.product_ids.tolist())))
    backgrounds = cluttered_backgrounds()
    spec = {"backbone": version.backbone, "weights": version.weights}
    vectors, queries, speed, unavailable = {}, {}, {}, {}
    for pk in catalog.image_ids.tolist():
        stored_image_bytes(catalog.files[pk])  # every precision then reads the files from the page cache alike
    for precision in ("fp32", *candidates()):
        try:
            model = get_embedder(spec, precision=precision)
        except PrecisionUnavailableError as exc:
            unavailable[precision] = str(exc)
            continue
        model.embed([load_catalog_image(catalog.files[pk]) for pk in catalog.image_ids[:8].tolist()])  # warm-up
        vectors[precision], images_per_s = embed_catalog(model, catalog)
        speed[precision] = round(images_per_s, 2)
        queries[precision] = query_vectors(model, plan, catalog, backgrounds)
    measured = [name for name in candidates() if name in vectors]
    figures = {name: _figures(catalog, plan, vectors[name], queries[name], version.identity)
               for name in ("fp32", *measured)}
    for name in measured:
        # Right after a switch the index still holds fp32 vectors: queries of ``name`` must find them too.
        figures[f"{name}_queries_fp32_catalog"] = _figures(catalog, plan, vectors["fp32"], queries[name],
                                                           version.identity, test_vectors=_aligned(vectors, name))
    chosen, reason = choose(figures, speed)
    if unavailable:
        reason += "; " + "; ".join(f"{name} cannot run here: {why}" for name, why in unavailable.items())
    return {"chosen": chosen, "reason": reason, "figures": figures, "images_per_s": speed,
            "images": len(catalog.image_ids), "queries": len(plan), "tolerance": TOLERANCE}


def choose(figures: dict, speed: dict) -> tuple[str, str]:
    """The fastest candidate within ``TOLERANCE`` of fp32 on every figure measured, else fp32, and why."""
    base = figures["fp32"]
    refused = []
    names = [name for name in figures if name != "fp32" and not name.endswith("_queries_fp32_catalog")]
    for name in sorted(names, key=lambda n: -speed.get(n, 0)):
        if speed.get(name, 0) < MIN_SPEEDUP * speed["fp32"]:
            refused.append(f"{name} was not {MIN_SPEEDUP:g}x as fast as fp32 here ({speed.get(name)} vs "
                           f"{speed['fp32']} images/s)")
            continue
        misses = [f"{figure} {label}: {value:.3f} vs fp32 {base[figure]:.3f}"
                  for label in (name, f"{name}_queries_fp32_catalog")
                  for figure, value in figures[label].items()
                  if value is not None and base[figure] is not None and value < base[figure] - TOLERANCE]
        if not misses:
            return name, (f"{name} is {speed[name] / speed['fp32']:.2f}x fp32's speed and within "
                          f"{TOLERANCE * 100:.1f} points of its recall@1 and top-1")
        refused.append(f"{name} loses more than {TOLERANCE * 100:.1f} points: " + "; ".join(misses))
    return "fp32", "; ".join(refused) or "no reduced precision to compare"


def _figures(catalog: CatalogImages, plan, vectors: CatalogVectors, queries: np.ndarray, identity: str,
             test_vectors: np.ndarray | None = None) -> dict:
    search = search_metrics(rank_products(vectors, plan, queries), plan, catalog.category_of)
    categories = category_figures(vectors, catalog, identity, test_vectors=test_vectors)
    return {"recall_at_1": search["recall_at_1"], "top1": categories["top1"] if categories else None}


def _aligned(vectors: dict, name: str) -> np.ndarray:
    """``name``'s vectors in the rows of fp32's: the same images, decoded alike, so the same ones failed."""
    row_of = {pk: row for row, pk in enumerate(vectors[name].image_ids.tolist())}
    return np.stack([vectors[name].vectors[row_of[pk]] for pk in vectors["fp32"].image_ids.tolist()])


def _progress(version: ModelVersion, stage: str) -> None:
    ModelVersion.objects.filter(pk=version.pk).update(progress={"stage": stage})
