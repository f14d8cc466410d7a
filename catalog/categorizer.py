"""Catalog auto-categorization: learn the catalog's own categories, suggest and apply them, check them.

Training (`categorizer_train_start` queues `workers.tasks.train_categorizer`, which runs
`categorizer_train`) reads stored embeddings only, no model: the indexed images of active, categorized
products, embedded by the model whose index search serves. The label is the product's category, the
group its product, so a product's images stay on one side of the held-out split. The head
(ml.categorizer) is saved under settings.CATEGORIZER_DIR with a `CategorizerVersion` row holding its
held-out metrics; the head in service is the newest `ready` one for a model identity, loaded once per
process and reloaded when a newer one appears.

Suggestions (`CategoryPrediction`, status `suggested`) are stored for every uncategorized product after
a training and whenever such a product gets an embedded image (pipeline._after_embedded). Accepting one
assigns its category; rejecting one keeps that category from being suggested for the product again.

The integrity check (`products_with_unlikely_category`) asks the cross-fitted check heads of
ml.category_audit rather than the head itself, which has learnt the catalog's mistakes along with the
rest of it.
"""
import datetime
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from catalog.models import (
    CategorizerVersion,
    Category,
    CategoryPrediction,
    Product,
    ProductImage,
    embedding_from_bytes,
)
from catalog.pipeline import active_index
from catalog.queue import enqueue, queue_check
from catalog.selectors import embedded_images
from ml import category_audit
from ml.categorizer import CategoryHead, CategoryHeadError, train_category_head

logger = logging.getLogger(__name__)
Status = CategorizerVersion.Status
Suggestion = CategoryPrediction.Status

SUGGESTIONS_PER_PRODUCT = 3
MIN_CATEGORIES = 2
MIN_PRODUCTS_PER_CATEGORY = 2
HOLDOUT = 0.2
UNLIKELY_THRESHOLD = category_audit.UNLIKELY_THRESHOLD
_CHUNK = 2000  # images per query when reading embeddings


# ----- training ----------------------------------------------------------------------------------

def _serving_identity() -> str:
    active = active_index()
    if active is None:
        raise ValidationError(
            "no image has been indexed yet; upload product images and give some products a category, then train"
        )
    return active["identity"]


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
    identity = _serving_identity()
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
    from workers.tasks import train_categorizer

    if not enqueue(train_categorizer, version_id=version_id):
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


# ----- the head in service, once per process -----------------------------------------------------

@dataclass
class _Loaded:
    pk: int
    version: str
    head: CategoryHead
    check_heads: list | None = None  # loaded on first use by the integrity check


_loaded: dict[str, _Loaded] = {}
_loaded_lock = threading.Lock()


def categorizer_in_service(*, identity: str) -> CategorizerVersion | None:
    """The newest ready version trained on `identity`'s embeddings."""
    return CategorizerVersion.objects.filter(status=Status.READY, model_identity=identity).order_by(
        "-trained_at", "-id"
    ).first()


def _version_in_service() -> CategorizerVersion | None:
    """The version in service for the model whose index search serves."""
    active = active_index()
    return categorizer_in_service(identity=active["identity"]) if active else None


def _current(identity: str) -> _Loaded | None:
    version = categorizer_in_service(identity=identity)
    if version is None:
        return None
    with _loaded_lock:
        loaded = _loaded.get(identity)
        if loaded is None or (loaded.pk, loaded.version) != (version.pk, version.version):
            try:
                head = CategoryHead.load(Path(settings.CATEGORIZER_DIR) / version.head_file, expected_identity=identity)
            except CategoryHeadError:
                logger.exception("categorizer %s cannot be loaded; train it again", version.version)
                return None
            loaded = _loaded[identity] = _Loaded(version.pk, version.version, head)
        return loaded


def current_head(*, identity: str) -> CategoryHead | None:
    """The head in service for vectors of `identity`, or None when none is trained for it."""
    loaded = _current(identity)
    return loaded.head if loaded else None


def _check_heads(loaded: _Loaded) -> list:
    if loaded.check_heads is None:
        heads = []
        for fold in range(category_audit.FOLDS):
            path = Path(settings.CATEGORIZER_DIR) / f"{loaded.version}.check{fold}.npz"
            try:
                heads.append(CategoryHead.load(path, expected_identity=loaded.head.identity) if path.exists() else None)
            except CategoryHeadError:
                logger.exception("check head %s cannot be loaded; train the categorizer again", path)
                heads.append(None)
        loaded.check_heads = heads
    return loaded.check_heads


def head_predict_categories(vector: np.ndarray, *, identity: str, top: int = 3) -> list[tuple[Category, float]] | None:
    """The head's top categories for one query vector, or None when no head serves `identity`."""
    head = current_head(identity=identity)
    if head is None:
        return None
    choices = head.predict_one(vector, k=top).choices
    categories = Category.objects.in_bulk([int(c) for c, _ in choices])
    return [(categories[int(c)], p) for c, p in choices if int(c) in categories]


# ----- suggestions -------------------------------------------------------------------------------

def _embeddings(identity: str, product_ids, exclude_image_ids=()) -> tuple[list[int], np.ndarray]:
    """(product id per image, vectors) of the products' images embedded by `identity`."""
    owners, vectors = [], []
    product_ids = list(product_ids)
    for start in range(0, len(product_ids), _CHUNK):
        rows = (
            embedded_images(identity).filter(product_id__in=product_ids[start:start + _CHUNK])
            .exclude(id__in=list(exclude_image_ids))
            .order_by("id").values_list("product_id", "embedding")
        )
        for product_id, blob in rows:
            owners.append(product_id)
            vectors.append(embedding_from_bytes(blob))
    return owners, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)


def suggestions_store(*, product_ids, identity: str, vectors_by_image: dict[int, tuple[int, np.ndarray]] | None = None) -> int:
    """Predict and store the suggestions of those of `product_ids` that have no category; returns how many products.

    A product's probabilities are the mean over its images. `vectors_by_image` ({image id: (product id,
    vector)}) supplies vectors just computed, so they are not read back. Each product's previous
    suggestions are replaced; categories rejected for it are not suggested again.
    """
    loaded = _current(identity)
    if loaded is None:
        return 0
    head = loaded.head
    uncategorized = set(Product.objects.filter(pk__in=list(product_ids), category__isnull=True).values_list("pk", flat=True))
    if not uncategorized:
        return 0
    given = {i: (p, v) for i, (p, v) in (vectors_by_image or {}).items() if p in uncategorized}
    owners, stored = _embeddings(identity, sorted(uncategorized), exclude_image_ids=given)
    vectors = list(stored) + [v for _, v in given.values()]
    owners += [p for p, _ in given.values()]
    if not owners:
        return 0
    products, probabilities = category_audit.mean_per_group(head.probabilities(np.stack(vectors)), owners)

    existing = set(Category.objects.filter(pk__in=[int(c) for c in head.categories]).values_list("pk", flat=True))
    rejected = set(
        CategoryPrediction.objects.filter(product_id__in=products, status=Suggestion.REJECTED)
        .values_list("product_id", "category_id")
    )
    suggestions = []
    for product_id, row in zip(products, probabilities):
        picked = 0
        for column in np.argsort(-row, kind="stable"):
            category_id = int(head.categories[column])
            if category_id not in existing or (product_id, category_id) in rejected:
                continue
            suggestions.append(CategoryPrediction(
                product_id=product_id, category_id=category_id, score=round(float(row[column]), 4),
                head_version=loaded.version,
            ))
            picked += 1
            if picked == SUGGESTIONS_PER_PRODUCT:
                break
    with transaction.atomic():
        CategoryPrediction.objects.filter(product_id__in=products, status=Suggestion.SUGGESTED).delete()
        # An accepted row of the same head and category may remain from before the category was removed.
        CategoryPrediction.objects.bulk_create(suggestions, ignore_conflicts=True)
    return len(products)


def suggestions_refresh(*, identity: str | None = None) -> int:
    """Store suggestions for every uncategorized product; drop those left on products that now have a category."""
    identity = identity or _serving_identity()
    CategoryPrediction.objects.filter(status=Suggestion.SUGGESTED, product__category__isnull=False).delete()
    ids = list(Product.objects.filter(category__isnull=True).order_by("id").values_list("id", flat=True))
    return sum(
        suggestions_store(product_ids=ids[start:start + _CHUNK], identity=identity)
        for start in range(0, len(ids), _CHUNK)
    )


def suggestions_after_embedding(*, images: list[ProductImage], vectors: np.ndarray, identity: str) -> int:
    """Pipeline hook: suggestions for the uncategorized products among a just-embedded batch.

    A failure here is logged, never raised: suggestions must not fail an embedding, and the next
    training refreshes them all.
    """
    try:
        given = {image.pk: (image.product_id, np.asarray(v, dtype=np.float32)) for image, v in zip(images, vectors)}
        return suggestions_store(product_ids={p for p, _ in given.values()}, identity=identity, vectors_by_image=given)
    except Exception:
        logger.exception("could not store category suggestions for images %s", [image.pk for image in images])
        return 0


def _assign(predictions: list[CategoryPrediction]) -> int:
    """Give each prediction's product its category; one prediction per product, the first given wins."""
    chosen: dict[int, CategoryPrediction] = {}
    for prediction in predictions:
        chosen.setdefault(prediction.product_id, prediction)
    now = timezone.now()
    by_category: dict[int, list[int]] = {}
    for prediction in chosen.values():
        by_category.setdefault(prediction.category_id, []).append(prediction.product_id)
    for category_id, product_ids in by_category.items():
        Product.objects.filter(pk__in=product_ids).update(category_id=category_id, updated_at=now)
    CategoryPrediction.objects.filter(pk__in=[p.pk for p in chosen.values()]).update(
        status=Suggestion.ACCEPTED, updated_at=now
    )
    # The product has its category: its other suggestions are answered.
    CategoryPrediction.objects.filter(product_id__in=list(chosen), status=Suggestion.SUGGESTED).delete()
    return len(chosen)


@transaction.atomic
def suggestions_apply(*, threshold: float) -> int:
    """Assign the top suggestion of every uncategorized product whose score is at least `threshold`.

    Returns how many products changed. Scores are calibrated probabilities: the threshold table of
    GET /api/categorizer/ says how often suggestions above a threshold were right.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValidationError({"threshold": f"threshold must be between 0 and 1, got {threshold}"})
    best: dict[int, CategoryPrediction] = {}
    for prediction in CategoryPrediction.objects.filter(
        status=Suggestion.SUGGESTED, product__category__isnull=True
    ).order_by("product_id", "-score", "id"):
        best.setdefault(prediction.product_id, prediction)
    return _assign([p for p in best.values() if p.score >= threshold])


@transaction.atomic
def suggestions_accept(*, prediction_ids: list[int]) -> int:
    """Assign the categories of these suggestions (the best one where several are of one product)."""
    predictions = CategoryPrediction.objects.filter(pk__in=prediction_ids).exclude(status=Suggestion.ACCEPTED)
    return _assign(list(predictions.order_by("product_id", "-score", "id")))


@transaction.atomic
def suggestions_reject(*, prediction_ids: list[int]) -> int:
    return CategoryPrediction.objects.filter(pk__in=prediction_ids, status=Suggestion.SUGGESTED).update(
        status=Suggestion.REJECTED, updated_at=timezone.now()
    )


# ----- the integrity check -----------------------------------------------------------------------

def products_with_unlikely_category(*, threshold: float = UNLIKELY_THRESHOLD) -> dict[int, float]:
    """{product id: probability of its own category} for categorized products that probability is under `threshold` for.

    Each product is judged by the check head of its fold, which never saw it. Products with no image
    embedded by the served model, or whose category the check head never saw, are not judged.
    """
    active = active_index()
    loaded = _current(active["identity"]) if active else None
    if loaded is None:
        return {}
    check_heads = _check_heads(loaded)
    categories = loaded.head.categories
    column = {c: i for i, c in enumerate(categories)}
    assigned = dict(Product.objects.filter(category__isnull=False).values_list("id", "category_id"))
    unlikely = {}
    ids = sorted(p for p, c in assigned.items() if str(c) in column)
    for start in range(0, len(ids), _CHUNK):
        owners, vectors = _embeddings(loaded.head.identity, ids[start:start + _CHUNK])
        if not owners:
            continue
        probabilities = category_audit.cross_fitted_probabilities(check_heads, vectors, owners, categories)
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
    serving = _version_in_service()
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


REPORT_FILES = ("index.html", "confusion.png", "per_category.png", "thresholds.png")


def categorizer_report_write(*, version: CategorizerVersion | None = None) -> Path:
    """Write the HTML report of a version (default: the one in service) with its PNG plots; returns its path."""
    from django.template.loader import render_to_string

    serving = _version_in_service()
    if version is None:
        version = serving
        if version is None:
            raise ValidationError("there is no trained categorizer to evaluate; train one first (manage.py train_categorizer)")
    if version.status != Status.READY:
        raise ValidationError(f"categorizer version {version.pk} is {version.status}, not ready; there is nothing to evaluate")
    relative = f"categorizer-{version.pk}"
    directory = Path(settings.REPORTS_DIR) / relative
    directory.mkdir(parents=True, exist_ok=True)
    metrics = version.metrics
    _plot_confusion(metrics["confusion"], directory / "confusion.png")
    _plot_per_category(metrics["per_category"], directory / "per_category.png")
    _plot_thresholds(metrics.get("thresholds", []), directory / "thresholds.png")

    unlikely, unlikely_count = None, None
    if serving == version:
        found = products_with_unlikely_category()
        products = Product.objects.select_related("category").in_bulk(list(found))
        unlikely = [(products[p], found[p]) for p in sorted(found, key=found.get)[:50] if p in products]
        unlikely_count = len(found)
    per_category = sorted(metrics["per_category"].items(), key=lambda item: (-item[1]["support"], item[0]))
    html = render_to_string("catalog/categorizer_report.html", {
        "version": version,
        "metrics": metrics,
        "per_category": per_category,
        "thresholds": metrics.get("thresholds", []),
        "unlikely": unlikely,
        "unlikely_count": unlikely_count,
        "unlikely_threshold": UNLIKELY_THRESHOLD,
        "written_at": timezone.now(),
    })
    (directory / "index.html").write_text(html)
    CategorizerVersion.objects.filter(pk=version.pk).update(report_file=f"{relative}/index.html", report_at=timezone.now())
    return directory / "index.html"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_confusion(confusion: dict, path: Path) -> None:
    labels, matrix = confusion["labels"], np.array(confusion["matrix"], dtype=float)
    size = min(4 + 0.4 * len(labels), 30)
    figure = _figure(size + 1, size)
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("predicted category")
    axes.set_ylabel("true category")
    axes.set_title("Held-out confusion matrix\n(colour: share of the true category, number: images)", fontsize=10)
    if len(labels) <= 25:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                axes.text(j, i, int(count), ha="center", va="center", fontsize=7,
                          color="white" if shares[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, shrink=0.7)
    figure.savefig(path)


def _plot_per_category(per_category: dict, path: Path) -> None:
    names = [n for n, v in sorted(per_category.items(), key=lambda item: -item[1]["support"]) if v["support"]]
    figure = _figure(8, max(2.5, 0.35 * len(names) + 1))
    axes = figure.subplots()
    positions = np.arange(len(names))
    precision = [per_category[n]["precision"] or 0.0 for n in names]
    recall = [per_category[n]["recall"] or 0.0 for n in names]
    axes.barh(positions - 0.2, precision, height=0.4, label="precision")
    axes.barh(positions + 0.2, recall, height=0.4, label="recall")
    axes.set_yticks(positions, [f"{n} ({per_category[n]['support']})" for n in names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("share of held-out images (category's images in brackets)")
    axes.set_title("Precision and recall per category", fontsize=10)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.savefig(path)


def _plot_thresholds(table: list[dict], path: Path) -> None:
    figure = _figure(6, 3.5)
    axes = figure.subplots()
    thresholds = [row["threshold"] for row in table]
    axes.plot(thresholds, [row["precision"] if row["precision"] is not None else np.nan for row in table],
              marker="o", label="precision: top suggestion right")
    axes.plot(thresholds, [row["coverage"] if row["coverage"] is not None else np.nan for row in table],
              marker="s", label="coverage: products reaching it")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("apply threshold")
    axes.set_title("What an apply threshold means (cross-fitted)", fontsize=10)
    axes.legend(loc="lower left")
    figure.savefig(path)
