"""Similar-product search over the published vector index.

Each searching process holds an IndexReader on the active index; it checks the manifest at most every
READER_CHECK_SECONDS and swaps in a new version without blocking searches already running.
"""
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from PIL import Image

from catalog.category_heads import head_predict_categories
from catalog.models import Category, ModelVersion, Product, ProductImage, embedding_from_bytes
from catalog.process_cache import ProcessCache
from catalog.selectors import category_descendant_ids, stored_image
from catalog.serving import active_index, embed_query, query_embedder
from ml.catalog_eval import first_match, match_of
from ml.images import ImageDecodeError, decode_image
from ml.index_store import IndexReader, index_directory
from ml.index_terms import IndexFileError
from ml.localize import Box, object_boxes
from ml.verify import Keypoints, Template, agreeing_points, aligned_correlation, keypoints, template

READER_CHECK_SECONDS = 0.5

log = logging.getLogger(__name__)

_readers: ProcessCache[str, IndexReader] = ProcessCache("index readers")


class SearchUnavailable(Exception):
    """No index is published yet: nothing has been embedded."""


def index_reader() -> IndexReader:
    active = active_index()
    if active is None:
        log.warning("searching found no active index in %s", settings.INDEX_DIR)
        raise SearchUnavailable("no image has been indexed yet; upload product images and try again")
    directory = index_directory(settings.INDEX_DIR, active["identity"])
    return _readers.get(str(directory), lambda: IndexReader(
        directory, expected_identity=active["identity"], check_interval=READER_CHECK_SECONDS,
    ))


def similar_images(vector: np.ndarray, *, k: int, allow_ids: np.ndarray | None = None) -> list[tuple[int, float]]:
    """(image id, cosine score) of the k nearest indexed images, best first."""
    try:
        index = index_reader().current()
    except IndexFileError as exc:
        log.warning("searching found no usable index: %s", exc)
        raise SearchUnavailable(str(exc)) from exc
    scores, ids = index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), k, allow_ids=allow_ids)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


@dataclass(frozen=True)
class ProductHit:
    product: Product
    image_id: int
    score: float


def similar_products(
    vector: np.ndarray,
    *,
    k: int,
    products=None,
    exclude_product_id: int | None = None,
) -> list[ProductHit]:
    """The k most similar active products, one hit per product (its best image), best first.

    `products` (a queryset) restricts the search inside the index through an allow-list of its image
    ids, so k hits come back whenever k such products have indexed images.
    """
    candidates = Product.objects.filter(is_active=True) if products is None else products.filter(is_active=True)
    if exclude_product_id is not None:
        candidates = candidates.exclude(pk=exclude_product_id)
    allow = None
    if products is not None or exclude_product_id is not None:
        allow = np.fromiter(
            ProductImage.objects.filter(product__in=candidates).values_list("id", flat=True), dtype=np.int64
        )
        if allow.size == 0:
            return []
    fetch = max(k * 3, 30)
    while True:
        found = similar_images(vector, k=fetch, allow_ids=allow)
        owner = dict(
            ProductImage.objects.filter(id__in=[i for i, _ in found], product__in=candidates)
            .values_list("id", "product_id")
        )
        best: dict[int, tuple[int, float]] = {}
        for image_id, score in found:
            product_id = owner.get(image_id)
            if product_id is not None and product_id not in best:
                best[product_id] = (image_id, score)
        exhausted = len(found) < fetch
        if len(best) >= k or exhausted:
            break
        fetch *= 4
    ranked = sorted(best.items(), key=lambda item: -item[1][1])[:k]
    by_id = Product.objects.select_related("category").prefetch_related("images").in_bulk([p for p, _ in ranked])
    return [ProductHit(by_id[p], image_id, score) for p, (image_id, score) in ranked if p in by_id]


# ----- shopper queries ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchResult:
    hits: list[ProductHit]
    predicted_categories: list[tuple[Category, float]]
    labels: list[tuple[str, float]]
    took_ms: int
    matches: list[str] = field(default_factory=list)  # "same_product", "similar" or "weak", per hit
    objects: list[Box] = field(default_factory=list)  # the distinct objects of the query photo


MIN_SHOWN_CATEGORY = 0.005  # a predicted category under half a percent would show as 0 %
_calibrations: ProcessCache[str, dict | None] = ProcessCache("match calibrations")
CALIBRATION_CHECK_SECONDS = 30


def match_calibration(identity: str) -> dict | None:
    """The served model's thresholds for "same_product" and "weak" (from its evaluation on the catalog)."""
    def load() -> dict | None:
        version = ModelVersion.objects.filter(identity=identity, status=ModelVersion.Status.SERVING).first()
        return (version.metrics or {}).get("calibration") if version else None

    return _calibrations.get(identity, load, stamp=int(time.monotonic() // CALIBRATION_CHECK_SECONDS))


_catalog_checks: ProcessCache[int, tuple[Keypoints, Template | None]] = ProcessCache(
    "catalog images' local features and products", size=256)


@dataclass
class FirstResultCheck:
    """The searched photo against the first result's image (``ml.verify``), each part done when first asked:
    its agreeing local features, and the correlation of the image's product aligned onto it. Both None when
    that image can no longer be read (the label then rests on the score)."""

    searched: Image.Image
    hit: ProductHit

    def points(self) -> int | None:
        return agreeing_points(keypoints(self.searched), self._reference[0]) if self._reference else None

    def correlation(self) -> float | None:
        return aligned_correlation(self.searched, self._reference[1]) if self._reference else None

    @cached_property
    def _reference(self) -> tuple[Keypoints, Template | None] | None:
        try:
            return _catalog_checks.get(self.hit.image_id, self._load)
        except (OSError, ImageDecodeError) as exc:
            log.warning("the first result's image %s cannot be checked against the photo: %s", self.hit.image_id, exc)
            return None

    def _load(self) -> tuple[Keypoints, Template | None]:
        # The hit's product came with its images: no query for the file's name.
        name = next((image.file.name for image in self.hit.product.images.all() if image.pk == self.hit.image_id),
                    None)
        if not name:
            raise OSError(f"image {self.hit.image_id} has no stored file")
        image = stored_image(name)
        return keypoints(image), template(image)


def decode_query(image_data: bytes, min_side: int):
    """The shopper's photo, decoded (never stored); a 400 saying why when it is not an image."""
    try:
        pil, _ = decode_image(
            image_data, allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS),
            max_pixels=settings.IMAGE_MAX_PIXELS, min_side=min_side,
        )
    except ImageDecodeError as exc:
        raise ValidationError({"image": str(exc)}) from None
    return pil


def crop_to(image, box: list[float] | None):
    """The region ``box`` ([x0, y0, x1, y1] fractions) of an image; the image itself without a box."""
    if box is None:
        return image
    x0, y0, x1, y1 = box
    width, height = image.size
    return image.crop((round(x0 * width), round(y0 * height), max(round(x1 * width), round(x0 * width) + 1),
                       max(round(y1 * height), round(y0 * height) + 1)))


def _filtered_products(*, category_id: int | None, min_price, max_price):
    if category_id is None and min_price is None and max_price is None:
        return None
    products = Product.objects.all()
    if category_id is not None:
        products = products.filter(category_id__in=category_descendant_ids(category_id))
    if min_price is not None:
        products = products.filter(price__gte=min_price)
    if max_price is not None:
        products = products.filter(price__lte=max_price)
    return products


def predict_categories(vector: np.ndarray, *, top: int = 3, neighbours: int = 20) -> list[tuple[Category, float]]:
    """Categories of the nearest categorized catalog images, score-weighted and normalised to sum to 1.

    Once a category head is trained for the served model, its calibrated probabilities instead.
    """
    active = active_index()
    predicted = head_predict_categories(vector, identity=active["identity"], top=top) if active else None
    if predicted is not None:
        return predicted
    try:
        found = similar_images(vector, k=neighbours)
    except SearchUnavailable:
        return []
    owners = dict(
        ProductImage.objects.filter(id__in=[i for i, _ in found], product__category__isnull=False,
                                    product__is_active=True)
        .values_list("id", "product__category_id")
    )
    votes: dict[int, float] = {}
    for image_id, score in found:
        if image_id in owners:
            votes[owners[image_id]] = votes.get(owners[image_id], 0.0) + float(np.exp(score / 0.1))
    total = sum(votes.values())
    ranked = sorted(votes.items(), key=lambda item: -item[1])[:top]
    categories = Category.objects.in_bulk([c for c, _ in ranked])
    return [(categories[c], v / total) for c, v in ranked if c in categories]


def search_catalog(
    *,
    image_data: bytes | None = None,
    product_id: int | None = None,
    k: int = 10,
    category_id: int | None = None,
    min_price=None,
    max_price=None,
    box: list[float] | None = None,
) -> SearchResult:
    """Search by an image (never stored), or its region ``box``, or by a catalog product ("more like this")."""
    started = time.perf_counter()
    labels: list[tuple[str, float]] = []
    objects: list[Box] = []
    searched = None  # the photo or its region, when searching by one
    if image_data is not None:
        model = query_embedder()
        photo = decode_query(image_data, model.min_side)
        searched = crop_to(photo, box)
        # One batch: the whole photo (its objects) and, with a box, the region searched.
        embedded = embed_query(model, [photo] if box is None else [photo, searched], maps=True)
        objects = object_boxes(photo, embedded.maps[0], model.preset)
        vector, labels = embedded.vectors[-1], list(embedded.labels[-1])
    else:
        if not Product.objects.filter(pk=product_id).exists():
            raise ValidationError({"product": f"there is no product {product_id}"})
        vectors = [
            embedding_from_bytes(blob) for blob in ProductImage.objects.filter(
                product_id=product_id, status=ProductImage.Status.INDEXED, embedding__isnull=False
            ).values_list("embedding", flat=True)
        ]
        if not vectors:
            raise ValidationError({"product": f"product {product_id} has no indexed image yet"})
        vector = np.mean(vectors, axis=0)
        vector /= max(float(np.linalg.norm(vector)), 1e-12)
    products = _filtered_products(category_id=category_id, min_price=min_price, max_price=max_price)
    try:
        # One product more than asked: the first result's margin over the next says whether it stands out.
        hits = similar_products(vector, k=k + 1, products=products, exclude_product_id=product_id)
        predicted = [(c, p) for c, p in predict_categories(vector) if p >= MIN_SHOWN_CATEGORY]
    except SearchUnavailable:
        hits, predicted = [], []
    active = active_index()
    calibration = match_calibration(active["identity"]) if active else None
    margins = [hit.score - hits[number + 1].score if number + 1 < len(hits) else None
               for number, hit in enumerate(hits)]
    matches = [match_of(hit.score, calibration, first=number == 0, margin=margins[number])
               for number, hit in enumerate(hits)]
    if searched is not None and hits:
        check = FirstResultCheck(searched, hits[0])
        matches[0] = first_match(hits[0].score, calibration, margin=margins[0], points=check.points,
                                 correlation=check.correlation)
    return SearchResult(hits=hits[:k], predicted_categories=predicted, labels=labels,
                        took_ms=round((time.perf_counter() - started) * 1000), matches=matches[:k], objects=objects)
