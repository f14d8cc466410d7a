"""Category suggestions for uncategorized products: stored from the head in service, reviewed, applied.

Suggestions (`CategoryPrediction`, status `suggested`) are stored for every uncategorized product after
a training and whenever such a product gets an embedded image (the pipeline's hook). Accepting one
assigns its category; rejecting one keeps that category from being suggested for the product again.
"""
import logging

import numpy as np
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from catalog.category_heads import PRODUCTS_PER_QUERY, head_embeddings, loaded_head, serving_identity
from catalog.models import Category, CategoryPrediction, Product, ProductImage
from ml import category_audit

logger = logging.getLogger(__name__)
Suggestion = CategoryPrediction.Status

SUGGESTIONS_PER_PRODUCT = 3


def suggestions_store(*, product_ids, identity: str, vectors_by_image: dict[int, tuple[int, np.ndarray]] | None = None) -> int:
    """Predict and store the suggestions of those of `product_ids` that have no category; returns how many products.

    A product's probabilities are the mean over its images. `vectors_by_image` ({image id: (product id,
    vector)}) supplies vectors just computed, so they are not read back. Each product's previous
    suggestions are replaced; categories rejected for it are not suggested again.
    """
    loaded = loaded_head(identity)
    if loaded is None:
        return 0
    head = loaded.head
    uncategorized = set(Product.objects.filter(pk__in=list(product_ids), category__isnull=True).values_list("pk", flat=True))
    if not uncategorized:
        return 0
    given = {i: (p, v) for i, (p, v) in (vectors_by_image or {}).items() if p in uncategorized}
    owners, stored = head_embeddings(identity, sorted(uncategorized), exclude_image_ids=given)
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
    identity = identity or serving_identity()
    CategoryPrediction.objects.filter(status=Suggestion.SUGGESTED, product__category__isnull=False).delete()
    ids = list(Product.objects.filter(category__isnull=True).order_by("id").values_list("id", flat=True))
    return sum(
        suggestions_store(product_ids=ids[start:start + PRODUCTS_PER_QUERY], identity=identity)
        for start in range(0, len(ids), PRODUCTS_PER_QUERY)
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
