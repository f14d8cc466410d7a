"""Catalog auto-categorization: learn the catalog's own categories, report how well, check the catalog.

Training (`categorizer_train_start` queues the `train_categorizer` task, which runs `categorizer_train`)
reads stored embeddings only, no model: the indexed images of active, categorized products, embedded by
the model whose index search serves. The label is the product's category, the group its product, so a
product's images stay on one side of the held-out split. The head (ml.categorizer) is saved under
settings.CATEGORIZER_DIR with a `CategorizerVersion` row holding its held-out metrics; which head serves
is catalog/category_heads.py's, and the suggestions it makes catalog/suggestions.py's.

The integrity check (`products_with_unlikely_category`) asks the cross-fitted check heads of
ml.category_audit rather than the head itself, which has learnt the catalog's mistakes along with the
rest of it.
"""
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from catalog.category_heads import (
    PRODUCTS_PER_QUERY,
    check_heads,
    head_embeddings,
    loaded_head,
    serving_identity,
    version_in_service,
)
from catalog.models import (
    CategorizerVersion,
    Category,
    Product,
    ProductImage,
    embedding_from_bytes,
)
from catalog.queue import enqueue, queue_check
from catalog.reports import write_categorizer_report
from catalog.serving import active_index
from catalog.suggestions import suggestions_refresh
from ml import category_audit
from ml.categorizer import train_category_head

logger = logging.getLogger(__name__)
Status = CategorizerVersion.Status

MIN_CATEGORIES = 2
MIN_PRODUCTS_PER_CATEGORY = 2
HOLDOUT = 0.2
UNLIKELY_THRESHOLD = category_audit.UNLIKELY_THRESHOLD


# ----- training ----------------------------------------------------------------------------------

def _categorized_images(identity: str):
    return ProductImage.objects.filter(
        model_identity=identity, status=ProductImage.Status.INDEXED, embedding__isnull=False,
        product__is_active=True, product__category__isnull=False,
    )


def _check_trainable(identity: str) -> None:
    products_per_category = dict(
        _categorized_images(identity).values_list("product__category_id")
        .annotate(products=Count("product_id", distinct=True)).values_list("product__category_id", "products")
    )
    usable = [c for c, n in products_per_category.items() if n >= MIN_PRODUCTS_PER_CATEGORY]
    if len(usable) < MIN_CATEGORIES:
        found = ", ".join(
            f"{Category.objects.get(pk=c).path}: {n}" for c, n in sorted(products_per_category.items())
        ) or "none"
        raise ValidationError(
            f"training needs at least {MIN_CATEGORIES} categories with {MIN_PRODUCTS_PER_CATEGORY} or more active "
            f"products whose images are indexed; {len(usable)} categories have that (products per category: "
            f"{found}). Give more products a category, or wait for their images to be indexed, then train again."
        )


def _expire_lost_trainings() -> None:
    """A training still `training` past the task's time limit lost its worker: say so."""
    cutoff = timezone.now() - datetime.timedelta(seconds=settings.CATEGORIZER_TRAIN_TIME_LIMIT + 60)
    CategorizerVersion.objects.filter(status=Status.TRAINING, created_at__lt=cutoff).update(
        status=Status.FAILED, error="the training did not finish (its worker stopped); start it again"
    )


def categorizer_train_start(*, created_by=None) -> CategorizerVersion:
    """Queue a training. Refuses (ValidationError) when the catalog has too few categorized products.

    One training at a time: while one runs, it is returned instead of starting another.
    """
    identity = serving_identity()
    _check_trainable(identity)
    _expire_lost_trainings()
    running = CategorizerVersion.objects.filter(status=Status.TRAINING).first()
    if running is not None:
        return running
    queue_check()
    with transaction.atomic():
        version = CategorizerVersion.objects.create(model_identity=identity, created_by=created_by)
        transaction.on_commit(lambda: _queue_training(version.pk))
    version.refresh_from_db()  # with in-process tasks it has already trained
    return version


def _queue_training(version_id: int) -> None:
    if not enqueue("train_categorizer", version_id=version_id):
        categorizer_fail(version_id=version_id, reason="the task queue did not take the training; start it again")


def categorizer_fail(*, version_id: int, reason: str) -> None:
    CategorizerVersion.objects.filter(pk=version_id, status=Status.TRAINING).update(
        status=Status.FAILED, error=reason[:2000]
    )


@dataclass(frozen=True)
class _TrainingData:
    vectors: np.ndarray
    labels: list[str]  # category ids, as the head names its categories
    product_ids: list[int]


def _training_data(identity: str) -> _TrainingData:
    rows = list(
        _categorized_images(identity).order_by("id").values_list("product_id", "product__category_id", "embedding")
    )
    vectors = np.stack([embedding_from_bytes(blob) for _, _, blob in rows]) if rows else None
    return _TrainingData(vectors, [str(c) for _, c, _ in rows], [p for p, _, _ in rows])


def categorizer_train(*, version_id: int) -> dict:
    """Train the head of a queued `CategorizerVersion`, then refresh every uncategorized product's suggestions.

    Idempotent: a version no longer `training` is left as it is.
    """
    version = CategorizerVersion.objects.filter(pk=version_id).first()
    if version is None or version.status != Status.TRAINING:
        return {"skipped": True}
    identity = version.model_identity
    try:
        _check_trainable(identity)  # the catalog may have changed since the request
        data = _training_data(identity)
        result = train_category_head(data.vectors, data.labels, identity=identity, groups=data.product_ids,
                                     holdout=HOLDOUT)
    except (ValidationError, ValueError) as exc:
        message = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        categorizer_fail(version_id=version_id, reason=message)
        return {"status": Status.FAILED, "error": message}

    head = result.head
    check_heads = category_audit.fit_check_heads(
        data.vectors, data.labels, data.product_ids, identity=identity,
        l2=result.metrics["l2"], temperature=result.metrics["temperature"],
    )
    directory = Path(settings.CATEGORIZER_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    head.save(directory / f"{head.version}.npz")
    for fold, check_head in enumerate(check_heads):
        if check_head is not None:
            check_head.save(directory / f"{head.version}.check{fold}.npz")

    names = {str(c.pk): c.path for c in Category.objects.filter(pk__in=[int(c) for c in head.categories])}
    metrics = _named_metrics(result.metrics, names)
    metrics["thresholds"] = _threshold_table(check_heads, data, head.categories)
    CategorizerVersion.objects.filter(pk=version_id).update(
        status=Status.READY, version=head.version, head_file=f"{head.version}.npz",
        n_train=result.metrics["n_train"], n_test=result.metrics["n_test"], metrics=metrics,
        trained_at=timezone.now(), error="",
    )
    version.refresh_from_db()
    try:
        categorizer_report_write(version=version)
    except Exception:  # the head is good without its report; evaluate_categorizer writes it again
        logger.exception("could not write the report of categorizer %s", head.version)
    suggested = suggestions_refresh(identity=identity)
    return {"status": Status.READY, "version": head.version, "n_train": version.n_train, "suggested": suggested}


def _named_metrics(metrics: dict, names: dict[str, str]) -> dict:
    """The head's metrics with category paths in place of category ids."""
    name = lambda c: names.get(c, f"deleted category {c}")  # noqa: E731
    return {
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "per_category": {name(c): values for c, values in metrics["per_category"].items()},
        "confusion": {"labels": [name(c) for c in metrics["confusion"]["labels"]],
                      "matrix": metrics["confusion"]["matrix"]},
        "untested_categories": [name(c) for c in metrics.get("untested_categories", [])],
        "n_train": metrics["n_train"],
        "n_test": metrics["n_test"],
        "temperature": metrics.get("temperature"),
    }


def _threshold_table(check_heads, data: _TrainingData, categories: list[str]) -> list[dict]:
    """How often a product's top prediction at or above each threshold is its category, cross-fitted."""
    probabilities = category_audit.cross_fitted_probabilities(check_heads, data.vectors, data.product_ids, categories)
    product_ids, per_product = category_audit.mean_per_group(probabilities, data.product_ids)
    label_of = dict(zip(data.product_ids, data.labels))
    judged = ~np.isnan(per_product).all(axis=1)
    top = np.nanargmax(np.where(judged[:, None], per_product, 0.0), axis=1)
    correct = [categories[t] == label_of[p] for p, t in zip(product_ids, top)]
    top_probability = np.nan_to_num(per_product[np.arange(len(top)), top])
    return category_audit.threshold_table(top_probability[judged], np.array(correct)[judged])


# ----- the integrity check -----------------------------------------------------------------------

CHECK_MIN_TOP1 = 0.6  # held-out top-1 under this: the check heads guess more than they judge


def integrity_check_weakness() -> str | None:
    """Why the integrity check cannot judge this catalog yet (None: it can): no head, or one too weak to
    tell a wrong category from its own uncertainty, which on a tiny catalog flagged most products."""
    version = version_in_service()
    if version is None:
        return "no category head serves yet: train it (manage.py train_categorizer)"
    top1, learnt = float(version.metrics.get("top1") or 0.0), int(version.n_train or 0)
    if top1 < CHECK_MIN_TOP1:
        return (f"the category head learnt from {learnt} images and is right for {top1:.0%} of held-out products; "
                f"the check needs {CHECK_MIN_TOP1:.0%} to tell a wrong category from its own uncertainty")
    return None


def products_with_unlikely_category(*, threshold: float = UNLIKELY_THRESHOLD) -> dict[int, float]:
    """{product id: probability of its own category} for categorized products that probability is under `threshold` for.

    Each product is judged by the check head of its fold, which never saw it. Products with no image
    embedded by the served model, or whose category the check head never saw, are not judged.
    """
    active = active_index()
    loaded = loaded_head(active["identity"]) if active else None
    if loaded is None or integrity_check_weakness() is not None:
        return {}
    heads = check_heads(loaded)
    categories = loaded.head.categories
    column = {c: i for i, c in enumerate(categories)}
    assigned = dict(Product.objects.filter(category__isnull=False).values_list("id", "category_id"))
    unlikely = {}
    ids = sorted(p for p, c in assigned.items() if str(c) in column)
    for start in range(0, len(ids), PRODUCTS_PER_QUERY):
        owners, vectors = head_embeddings(loaded.head.identity, ids[start:start + PRODUCTS_PER_QUERY])
        if not owners:
            continue
        probabilities = category_audit.cross_fitted_probabilities(heads, vectors, owners, categories)
        products, per_product = category_audit.mean_per_group(probabilities, owners)
        for product_id, row in zip(products, per_product):
            p = row[column[str(assigned[product_id])]]
            if not np.isnan(p) and p < threshold:
                unlikely[product_id] = float(p)
    return unlikely


# ----- status and report -------------------------------------------------------------------------

def categorizer_status() -> dict:
    """What GET /api/categorizer/ answers: the newest training's state and the head in service."""
    latest = CategorizerVersion.objects.order_by("-id").first()
    serving = version_in_service()
    if latest is not None and latest.status in (Status.TRAINING, Status.FAILED):
        status, error = latest.status, latest.error
    elif serving is not None:
        status, error = Status.READY, ""
    else:
        status = Status.UNTRAINED
        error = "" if latest is None else "the trained head was trained on another model's embeddings; train again"
    metrics = None
    if serving is not None:
        metrics = {key: serving.metrics.get(key) for key in ("top1", "top5", "per_category", "thresholds")}
    return {
        "status": str(status),
        "error": error,
        "version": serving.version if serving else None,
        "model_identity": serving.model_identity if serving else None,
        "trained_at": serving.trained_at if serving else None,
        "n_train": serving.n_train if serving else None,
        "n_test": serving.n_test if serving else None,
        "metrics": metrics,
    }


def categorizer_latest_report() -> CategorizerVersion | None:
    return CategorizerVersion.objects.exclude(report_file="").order_by("-report_at", "-id").first()


def categorizer_report_write(*, version: CategorizerVersion | None = None) -> Path:
    """Write the HTML report of a version (default: the one in service) with its plots; returns its path.

    The version in service also lists the products whose category looks unlikely.
    """
    serving = version_in_service()
    if version is None:
        version = serving
        if version is None:
            raise ValidationError("there is no trained categorizer to evaluate; train one first (manage.py train_categorizer)")
    if version.status != Status.READY:
        raise ValidationError(f"categorizer version {version.pk} is {version.status}, not ready; there is nothing to evaluate")
    unlikely, unlikely_count = None, None
    if serving == version:
        found = products_with_unlikely_category()
        products = Product.objects.select_related("category").in_bulk(list(found))
        unlikely = [(products[p], found[p]) for p in sorted(found, key=found.get)[:50] if p in products]
        unlikely_count = len(found)
    path = write_categorizer_report(version=version, unlikely=unlikely, unlikely_count=unlikely_count,
                                    unlikely_threshold=UNLIKELY_THRESHOLD)
    CategorizerVersion.objects.filter(pk=version.pk).update(
        report_file=str(path.relative_to(settings.REPORTS_DIR)), report_at=timezone.now()
    )
    return path
