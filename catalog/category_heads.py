"""The category head in service for each model identity: which version it is, loaded once per process.

The head in service is the newest `ready` CategorizerVersion trained on a model identity's embeddings
(the served one, for shoppers); a newer version is loaded as soon as it appears.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError

from catalog.models import CategorizerVersion, Category, embedding_from_bytes
from catalog.process_cache import ProcessCache
from catalog.selectors import embedded_images
from catalog.serving import active_index
from ml import category_audit
from ml.categorizer import CategoryHead, CategoryHeadError

logger = logging.getLogger(__name__)
Status = CategorizerVersion.Status

PRODUCTS_PER_QUERY = 2000  # products per query when reading embeddings


def serving_identity() -> str:
    active = active_index()
    if active is None:
        raise ValidationError(
            "no image has been indexed yet; upload product images and give some products a category, then train"
        )
    return active["identity"]


@dataclass
class _Loaded:
    pk: int
    version: str
    head: CategoryHead
    check_heads: list | None = None  # loaded on first use by the integrity check


# The head in service for each model identity, stamped with the version row it was loaded from.
_heads: ProcessCache[str, _Loaded] = ProcessCache("category heads")


def categorizer_in_service(*, identity: str) -> CategorizerVersion | None:
    """The newest ready version trained on `identity`'s embeddings."""
    return CategorizerVersion.objects.filter(status=Status.READY, model_identity=identity).order_by(
        "-trained_at", "-id"
    ).first()


def version_in_service() -> CategorizerVersion | None:
    """The version in service for the model whose index search serves."""
    active = active_index()
    return categorizer_in_service(identity=active["identity"]) if active else None


def loaded_head(identity: str) -> _Loaded | None:
    version = categorizer_in_service(identity=identity)
    if version is None:
        return None

    def load() -> _Loaded:
        head = CategoryHead.load(Path(settings.CATEGORIZER_DIR) / version.head_file, expected_identity=identity)
        return _Loaded(version.pk, version.version, head)

    try:
        return _heads.get(identity, load, stamp=(version.pk, version.version))
    except CategoryHeadError:
        logger.exception("categorizer %s cannot be loaded; train it again", version.version)
        return None


def current_head(*, identity: str) -> CategoryHead | None:
    """The head in service for vectors of `identity`, or None when none is trained for it."""
    loaded = loaded_head(identity)
    return loaded.head if loaded else None


def check_heads(loaded: _Loaded) -> list:
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


def head_embeddings(identity: str, product_ids, exclude_image_ids=()) -> tuple[list[int], np.ndarray]:
    """(product id per image, vectors) of the products' images embedded by `identity`."""
    owners, vectors = [], []
    product_ids = list(product_ids)
    for start in range(0, len(product_ids), PRODUCTS_PER_QUERY):
        rows = (
            embedded_images(identity).filter(product_id__in=product_ids[start:start + PRODUCTS_PER_QUERY])
            .exclude(id__in=list(exclude_image_ids))
            .order_by("id").values_list("product_id", "embedding")
        )
        for product_id, blob in rows:
            owners.append(product_id)
            vectors.append(embedding_from_bytes(blob))
    return owners, np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
