"""The models the service knows, which one embeds, and switching between them: promotion and rollback.

Every model has a row (`ModelVersion`); the one whose status is `serving` embeds new images and queries.
The database holds the serving model's vectors; every other model keeps its own in its vector store (a
fine-tuning's shadow embeddings, or a retired model's, archived when it stepped down), and its own index
directory, so switching back and forth needs no re-embedding. Nothing is deleted until staff delete it.
"""
import logging
import shutil
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from catalog.categorizer import categorizer_train_start
from catalog.indexing import index_verify, index_writer_lock
from catalog.models import ModelVersion, ProductImage, embedding_from_bytes, embedding_to_bytes
from catalog.pipeline import images_reembed_for_current_model
from catalog.selectors import embedded_images
from catalog.serving import activate, active_index, write_promoted
from ml.index_store import index_directory
from ml.vector_store import VectorStore

logger = logging.getLogger(__name__)
Status = ModelVersion.Status
ARCHIVE_CHUNK = 2_000  # images per read when archiving a model's vectors


def model_directory(version: ModelVersion) -> Path:
    return Path(settings.MODELS_DIR) / str(version.pk)


def vector_store(version: ModelVersion) -> VectorStore:
    return VectorStore(model_directory(version) / "vectors")


def serving_version() -> ModelVersion | None:
    """The row of the model search serves, created the first time for the model the service started with."""
    serving = ModelVersion.objects.filter(status=Status.SERVING).order_by("-id").first()
    if serving is not None:
        return serving
    active = active_index()
    if active is None:
        return None
    with transaction.atomic():
        serving, _ = ModelVersion.objects.get_or_create(
            identity=active["identity"], status=Status.SERVING,
            defaults={"backbone": active["backbone"], "weights": active["weights"]},
        )
    return serving


def model_list():
    serving_version()  # the model the service started with is listed too
    return ModelVersion.objects.select_related("compared_with").order_by("-id")


def model_promote(*, version: ModelVersion, reason: str = "promoted by hand") -> ModelVersion:
    """Make ``version`` the serving model: its vectors into the database, its index served, the category
    head retrained on them; the model it replaces is retired with its vectors archived."""
    current = serving_version()
    if current is not None and current.pk == version.pk:
        raise ValidationError(f"model {version.pk} is already serving")
    if version.status in ModelVersion.WORKING:
        raise ValidationError(f"model {version.pk} is still {version.status}; wait until it has finished")
    if version.status == Status.FAILED or not version.identity:
        raise ValidationError(f"model {version.pk} did not finish ({version.error or version.status}); "
                              "there is nothing to promote")
    store = vector_store(version)
    if not store.count():
        raise ValidationError(f"model {version.pk} has no vectors of the catalog's images; it cannot serve")
    with index_writer_lock():
        if current is not None:
            _archive_vectors(current)
        _vectors_into_database(version, store)
        configured_spec = {"backbone": settings.EMBED_BACKBONE, "weights": settings.EMBED_WEIGHTS}
        spec = {"backbone": version.backbone, "weights": version.weights}
        write_promoted(None if spec == configured_spec else {**spec, "identity": version.identity,
                                                             "version": version.pk})
        activate(version.identity, spec)
        now = timezone.now()
        if current is not None:
            ModelVersion.objects.filter(pk=current.pk).update(status=Status.RETIRED, updated_at=now)
        ModelVersion.objects.filter(pk=version.pk).update(
            status=Status.SERVING, decision={**version.decision, "promoted": True, "why": reason}, updated_at=now,
        )
    logger.info("model %s (%s) now serves: %s", version.pk, version.identity, reason)
    index_verify(repair=True)  # images deleted or added while it was not serving
    images_reembed_for_current_model()
    try:
        categorizer_train_start()
    except ValidationError as exc:  # too few categorized products: there is no head to retrain
        logger.info("no category head retrained after the promotion: %s", " ".join(exc.messages))
    version.refresh_from_db()
    return version


def model_rollback(*, version: ModelVersion) -> ModelVersion:
    """Serve again the model ``version`` replaced; returns that model."""
    if version.status != Status.SERVING:
        raise ValidationError(f"model {version.pk} is {version.status}, not serving; only the serving model "
                              "can be rolled back")
    previous = version.compared_with or version.parent
    if previous is None:
        raise ValidationError(f"model {version.pk} replaced no other model; there is nothing to roll back to")
    return model_promote(version=previous, reason=f"rolled back from model {version.pk}")


def model_delete(*, version: ModelVersion) -> None:
    """Delete a model that does not serve: its row, checkpoint, vectors and index."""
    if version.status == Status.SERVING or version.status in ModelVersion.WORKING:
        raise ValidationError(f"model {version.pk} is {version.status}; only a model that does not serve and is "
                              "not working can be deleted")
    shutil.rmtree(model_directory(version), ignore_errors=True)
    if version.identity and not ModelVersion.objects.filter(identity=version.identity).exclude(pk=version.pk).exists():
        shutil.rmtree(index_directory(settings.INDEX_DIR, version.identity), ignore_errors=True)
    version.delete()


def _archive_vectors(version: ModelVersion) -> None:
    """The serving model's vectors, from the database into its vector store (once)."""
    store = vector_store(version)
    if store.count():
        return
    last = 0
    while True:
        rows = list(embedded_images(version.identity).filter(id__gt=last).order_by("id")
                    .values_list("id", "embedding")[:ARCHIVE_CHUNK])
        if not rows:
            return
        store.append(np.array([pk for pk, _ in rows]), np.stack([embedding_from_bytes(b) for _, b in rows]))
        last = rows[-1][0]


def _vectors_into_database(version: ModelVersion, store: VectorStore) -> None:
    for ids, vectors in store:
        images = [ProductImage(pk=int(pk), embedding=embedding_to_bytes(vector), model_identity=version.identity)
                  for pk, vector in zip(ids, vectors)]
        ProductImage.objects.bulk_update(images, ["embedding", "model_identity"], batch_size=500)
