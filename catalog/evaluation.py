"""The catalog's own evaluation of a model: search by shopper-like photos, categories of held-out products.

Both a served model and a candidate are measured on exactly the same queries (``ml.catalog_eval``): one
per product, made from a catalog image by transformations no training uses, and the same held-out
products for the category figures. The serving model's vectors are the database's; any other model's are
in its vector store. Results are stored on the model's row with an HTML report.
"""
import logging
from dataclasses import dataclass, replace

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from PIL import Image

from catalog.model_versions import serving_version, vector_store
from catalog.models import Category, ModelVersion, Product, ProductImage, embedding_from_bytes
from catalog.queue import enqueue, queue_check
from catalog.reports import write_evaluation_report
from catalog.selectors import embedded_images, stored_image, stored_image_bytes
from catalog.serving import get_embedder
from ml.augment import cluttered_backgrounds
from ml.bulk import embed_sources
from ml.catalog_eval import (
    CatalogVectors,
    category_metrics,
    held_out,
    match_calibration,
    query_plan,
    rank_products,
    search_metrics,
    shopper_queries,
    verification,
)
from ml.images import ImageDecodeError

logger = logging.getLogger(__name__)
Status = ModelVersion.Status
QUERY_DECODE_SIDE = 448  # catalog images are decoded at least this large before a query photo is made of them
QUERY_BATCH = 32


@dataclass(frozen=True)
class CatalogImages:
    """The catalog as the evaluation sees it: active products' images that did not fail."""

    image_ids: np.ndarray
    product_ids: np.ndarray
    category_of: dict[int, str]  # product id -> category path (categorized products only)
    files: dict[int, str]

    def image(self, image_id: int) -> Image.Image:
        """A catalog image decoded as the evaluation's queries are made from it."""
        return load_catalog_image(self.files[image_id])


def catalog_images() -> CatalogImages:
    rows = list(ProductImage.objects.filter(product__is_active=True).exclude(status=ProductImage.Status.FAILED)
                .order_by("id").values_list("id", "product_id", "file"))
    categories = {}
    for product_id, path_parts in _category_paths():
        categories[product_id] = path_parts
    return CatalogImages(
        image_ids=np.array([r[0] for r in rows], dtype=np.int64),
        product_ids=np.array([r[1] for r in rows], dtype=np.int64),
        category_of=categories,
        files={r[0]: r[2] for r in rows},
    )


def catalog_sample(catalog: CatalogImages, products: int) -> CatalogImages:
    """The images of at most ``products`` of the catalog's products, drawn with a fixed seed."""
    unique = np.unique(catalog.product_ids)
    if len(unique) <= products:
        return catalog
    keep = np.isin(catalog.product_ids, np.random.default_rng(0).choice(unique, products, replace=False))
    return replace(catalog, image_ids=catalog.image_ids[keep], product_ids=catalog.product_ids[keep])


def _category_paths():
    paths = {c.pk: c.path for c in Category.objects.select_related("parent")}
    for product_id, category_id in Product.objects.filter(category__isnull=False).values_list("id", "category_id"):
        yield product_id, paths[category_id]


def model_vectors(version: ModelVersion, catalog: CatalogImages, serving: ModelVersion | None) -> CatalogVectors:
    """The model's vectors of the catalog's images: the database's for the serving model, else its store's."""
    wanted = set(catalog.image_ids.tolist())
    product_of = dict(zip(catalog.image_ids.tolist(), catalog.product_ids.tolist()))
    ids, vectors = [], []
    if serving is not None and version.pk == serving.pk:
        for pk, blob in embedded_images(version.identity).order_by("id").values_list("id", "embedding").iterator(
                chunk_size=2000):
            if pk in wanted:
                ids.append(pk)
                vectors.append(embedding_from_bytes(blob))
    else:
        for chunk_ids, chunk_vectors in vector_store(version):
            keep = np.isin(chunk_ids, catalog.image_ids)
            ids.extend(chunk_ids[keep].tolist())
            vectors.extend(chunk_vectors[keep])
    if not ids:
        raise ValidationError(f"model {version.pk} has no vectors of the catalog's images to evaluate")
    array = np.stack(vectors).astype(np.float32)
    array /= np.linalg.norm(array, axis=1, keepdims=True)
    return CatalogVectors(np.array(ids, dtype=np.int64), np.array([product_of[i] for i in ids], dtype=np.int64), array)


def embed_catalog(model, catalog: CatalogImages, *, on_progress=None) -> tuple[CatalogVectors, float]:
    """``model``'s vectors of the catalog's images, decoded in threads while it runs (an image that no longer
    decodes is left out), and its images per second. ``on_progress(images done)`` after every batch."""
    bulk = embed_sources(model, catalog.image_ids.tolist(), read=lambda pk: stored_image_bytes(catalog.files[pk]),
                         on_progress=on_progress and (lambda done, failed: on_progress(done + failed)))
    for pk, reason in bulk.failures:  # as the pipeline fails it
        logger.warning("image %s cannot be read for model %s; left out: %s", pk, model.identity.key, reason)
    product_of = dict(zip(catalog.image_ids.tolist(), catalog.product_ids.tolist()))
    ids = np.array(bulk.sources, dtype=np.int64)
    return (CatalogVectors(ids, np.array([product_of[i] for i in ids.tolist()], np.int64), bulk.vectors),
            bulk.images_per_s)


def load_catalog_image(file_name: str) -> Image.Image:
    return stored_image(file_name, min_side=QUERY_DECODE_SIDE)


def evaluate(versions: list[ModelVersion], *, on_progress=None) -> list[dict]:
    """Each model's figures on the same queries and held-out products: [{"search", "categories"}]."""
    catalog = catalog_images()
    if len(catalog.image_ids) < 2:
        raise ValidationError("the catalog needs images of at least two products to be evaluated")
    plan = query_plan(list(zip(catalog.image_ids.tolist(), catalog.product_ids.tolist())))
    backgrounds = cluttered_backgrounds()
    serving = serving_version()
    results = []
    for number, version in enumerate(versions):
        vectors = model_vectors(version, catalog, serving)
        model = get_embedder({"backbone": version.backbone, "weights": version.weights})

        def progress(done: int, number=number, version=version) -> None:
            if on_progress:
                # Two passes over the queries per model: embedding them, then checking their first results.
                on_progress(f"evaluating model {version.pk}", 2 * number * len(plan) + done,
                            2 * len(versions) * len(plan))

        queries = query_vectors(model, plan, catalog, backgrounds, on_progress=progress)
        rankings = rank_products(vectors, plan, queries)
        checks = verification(rankings, plan, lambda query: shopper_queries([query], catalog.image, backgrounds)[0][1],
                              catalog.image, on_progress=lambda done: progress(len(plan) + done))
        results.append({"search": search_metrics(rankings, plan, catalog.category_of),
                        "categories": category_figures(vectors, catalog, version.identity),
                        "calibration": match_calibration(rankings, catalog.category_of, checks),
                        "queries": len(plan), "images": len(vectors.image_ids)})
    return results


def query_vectors(model, plan: list, catalog: CatalogImages, backgrounds, *, on_progress=None) -> np.ndarray:
    """The plan's shopper-like query photos embedded by ``model``: the same seeded photos for every model."""
    batches = []
    for start in range(0, len(plan), QUERY_BATCH):
        # Made again for each model rather than all held in memory.
        photos = shopper_queries(plan[start:start + QUERY_BATCH],
                                 catalog.image, backgrounds)
        batches.append(model.embed([photo for _, photo, _ in photos]).vectors)
        if on_progress:
            on_progress(start + len(photos))
    return np.concatenate(batches)


def category_figures(vectors: CatalogVectors, catalog: CatalogImages, identity: str,
                     test_vectors: np.ndarray | None = None) -> dict | None:
    """Top-1/top-5 of a category head trained on the non-held-out products' ``vectors`` and tested on the
    held-out ones' (``test_vectors``' rows instead, when given: another precision's vectors of the same images)."""
    train_rows, test_rows = [], []
    for row, product in enumerate(vectors.product_ids.tolist()):
        if product in catalog.category_of:
            (test_rows if held_out(product) else train_rows).append(row)
    train = (vectors.vectors[train_rows], [catalog.category_of[int(vectors.product_ids[r])] for r in train_rows],
             [int(vectors.product_ids[r]) for r in train_rows])
    tested = vectors.vectors if test_vectors is None else test_vectors
    test = (tested[test_rows], [catalog.category_of[int(vectors.product_ids[r])] for r in test_rows])
    return category_metrics(train, test, identity=identity)


# ----- the served model's evaluation, on demand ------------------------------------------------------

def evaluation_start() -> ModelVersion:
    """Queue the evaluation of the serving model (POST /api/evaluate/, manage.py evaluate)."""
    serving = serving_version()
    if serving is None:
        raise ValidationError("no model serves yet: upload product images first")
    queue_check()
    with transaction.atomic():
        ModelVersion.objects.filter(pk=serving.pk).update(progress={"stage": "queued for evaluation"})
        transaction.on_commit(lambda: enqueue("evaluate_model", version_id=serving.pk))
    serving.refresh_from_db()
    return serving


def evaluation_run(*, version_id: int) -> dict:
    """Evaluate one model (the serving one, on demand) and store its figures and report."""
    version = ModelVersion.objects.get(pk=version_id)
    try:
        [metrics] = evaluate([version])
    except (ValidationError, ImageDecodeError) as exc:
        message = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        ModelVersion.objects.filter(pk=version.pk).update(progress={"stage": "evaluation failed", "error": message})
        return {"error": message}
    ModelVersion.objects.filter(pk=version.pk).update(metrics=metrics, progress={"stage": "evaluated"},
                                                      updated_at=timezone.now())
    version.refresh_from_db()
    evaluation_report(version)
    return metrics


def evaluation_report(version: ModelVersion) -> None:
    path = write_evaluation_report(version=version)
    ModelVersion.objects.filter(pk=version.pk).update(report_file=str(path.relative_to(settings.REPORTS_DIR)))
