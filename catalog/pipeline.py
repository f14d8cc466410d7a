"""The embedding pipeline, from a stored image to a searchable vector.

upload (services.product_image_add) -> embed_images task (images_embed: decode, one forward pass per
batch, store the embedding) -> index_images task (index_apply: the single writer upserts the vectors and
publishes a new index version) -> searching processes pick the version up (search.similar_images).

When the configured model changes, every image is re-embedded into the new identity's index, and
search switches over (catalog/serving.py) only once that index holds every image.
"""
import contextlib
import datetime
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from catalog.models import ProductImage, embedding_from_bytes, embedding_to_bytes
from catalog.process_cache import ProcessCache
from catalog.queue import enqueue, queue_backlog
from catalog.selectors import embedded_images
from catalog.serving import get_embedder, maybe_activate, served_model
from catalog.suggestions import suggestions_after_embedding
from ml.files import exclusive_lock
from ml.images import ImageDecodeError, decode_image
from ml.index import IndexFileError, VectorIndex
from ml.index_build import build_index
from ml.index_store import index_directory, load_index, read_manifest, save_index

logger = logging.getLogger(__name__)
Status = ProductImage.Status

# ----- embedding ---------------------------------------------------------------------------------

def _read_and_decode(image: ProductImage, min_side: int):
    try:
        with default_storage.open(image.file.name, "rb") as f:
            data = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise ImageDecodeError(f"the stored file {image.file.name} cannot be read ({exc})") from exc
    pil, _ = decode_image(
        data, allowed_formats=frozenset(settings.IMAGE_ALLOWED_FORMATS), max_pixels=settings.IMAGE_MAX_PIXELS,
        min_side=min_side,
    )
    return pil


def images_embed(*, image_ids: list[int]) -> dict:
    """Embed the given images in one batch and queue them for indexing. Idempotent.

    Images already embedded by the configured model are not embedded again, only re-queued for
    indexing; images that cannot be decoded end `failed` with the reason.
    """
    model = get_embedder()
    identity = model.identity.key
    images = list(ProductImage.objects.filter(id__in=image_ids).order_by("id"))
    done = [i.pk for i in images if i.model_identity == identity and i.embedding is not None]
    done_ids = set(done)
    todo = [i for i in images if i.pk not in done_ids]
    ProductImage.objects.filter(id__in=[i.pk for i in todo]).update(
        status=Status.PROCESSING, updated_at=timezone.now()
    )

    decoded, failed = [], 0
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(todo)))) as pool:
        results = pool.map(lambda img: _try(lambda: _read_and_decode(img, model.min_side)), todo)
        for image, (pil, error) in zip(todo, results):
            if error is not None:
                failed += 1
                ProductImage.objects.filter(pk=image.pk).update(
                    status=Status.FAILED, error=str(error), updated_at=timezone.now()
                )
            else:
                decoded.append((image, pil))

    embedded = []
    for start in range(0, len(decoded), settings.EMBED_BATCH_SIZE):
        batch = decoded[start:start + settings.EMBED_BATCH_SIZE]
        result = model.embed([pil for _, pil in batch])
        with transaction.atomic():  # one commit per batch, not per image
            _store_embeddings(batch, result, identity)
        embedded += [image.pk for image, _ in batch]
        # Work that rides on the same forward pass: category suggestions for uncategorized products.
        suggestions_after_embedding(images=[image for image, _ in batch], vectors=result.vectors, identity=identity)

    to_index = done + embedded
    if to_index:
        enqueue("index_images", add_ids=to_index, model=served_model(model))
    return {"embedded": len(embedded), "already": len(done), "failed": failed}


def _store_embeddings(batch, result, identity: str) -> None:
    for (image, _), vector, labels in zip(batch, result.vectors, result.labels):
        ProductImage.objects.filter(pk=image.pk).update(
            embedding=embedding_to_bytes(vector),
            model_identity=identity,
            labels=[{"label": label, "score": round(float(score), 4)} for label, score in labels],
            error="",
            updated_at=timezone.now(),
        )


def _try(fn):
    try:
        return fn(), None
    except ImageDecodeError as exc:
        return None, exc


def images_mark_failed(*, image_ids: list[int], reason: str) -> int:
    """The last retry failed: say so on every image of the batch that is not done."""
    return ProductImage.objects.filter(id__in=image_ids).exclude(status=Status.INDEXED).update(
        status=Status.FAILED, error=reason[:2000], updated_at=timezone.now()
    )


# ----- the index writer --------------------------------------------------------------------------

# The writer's copy of each identity's index, stamped with the published version it holds.
_writer_indexes: ProcessCache[str, VectorIndex] = ProcessCache("index writer copies")
_writer_thread_lock = threading.Lock()


@contextlib.contextmanager
def index_writer_lock() -> Iterator[None]:
    """One index writer at a time: across threads of this process and across processes."""
    root = Path(settings.INDEX_DIR)
    root.mkdir(parents=True, exist_ok=True)
    with _writer_thread_lock, exclusive_lock(root / ".writer.lock"):
        yield


def _writer_index(identity: str, dim: int | None) -> VectorIndex | None:
    """The writer's copy of an identity's index, loaded again if another process published since.

    With nothing published yet: the copy being built, or a new empty one when `dim` is given.
    """
    directory = index_directory(settings.INDEX_DIR, identity)
    try:
        version = read_manifest(directory)["version"]
    except IndexFileError:
        version = None
    if version is not None:
        return _writer_indexes.get(str(directory), lambda: _load_or_rebuild(identity), stamp=version)
    index = _writer_indexes.peek(str(directory))
    if index is None and dim is not None:
        index = VectorIndex(identity, dim, exact_threshold=settings.INDEX_EXACT_THRESHOLD)
        _writer_indexes.put(str(directory), index, stamp=None)
    return index


def _load_or_rebuild(identity: str) -> VectorIndex | None:
    directory = index_directory(settings.INDEX_DIR, identity)
    try:
        return load_index(directory, expected_identity=identity)
    except IndexFileError:
        logger.exception("index %s is unusable; rebuilding it from the database", directory)
        return _build_from_database(identity)


def _vectors(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([pk for pk, _ in rows], dtype=np.int64)
    vectors = np.stack([embedding_from_bytes(blob) for _, blob in rows]) if rows else None
    return ids, vectors


def _embedded_rows(identity: str, ids: list[int] | None = None) -> list[tuple[int, bytes]]:
    rows = embedded_images(identity)
    if ids is not None:
        rows = rows.filter(id__in=ids)
    return list(rows.order_by("id").values_list("id", "embedding"))


def _build_from_database(identity: str) -> VectorIndex | None:
    ids, vectors = _vectors(_embedded_rows(identity))
    if vectors is None:
        return None
    return build_index(ids, vectors, identity, exact_threshold=settings.INDEX_EXACT_THRESHOLD)


def _publish(index: VectorIndex) -> None:
    directory = index_directory(settings.INDEX_DIR, index.identity)
    if index.needs_rebuild:
        ids = index.ids()
        rows = dict(_embedded_rows(index.identity, ids=[int(i) for i in ids]))
        kept = np.array([i for i in ids if int(i) in rows], dtype=np.int64)
        vectors = np.stack([embedding_from_bytes(rows[int(i)]) for i in kept])
        index = build_index(kept, vectors, index.identity, exact_threshold=settings.INDEX_EXACT_THRESHOLD)
    save_index(index, directory)
    _writer_indexes.put(str(directory), index, stamp=index.version)


def index_apply(*, add_ids: list[int], remove_ids: list[int], model: dict | None = None) -> dict:
    """Upsert the embedded images in add_ids, remove remove_ids, publish. Idempotent.

    `model` ({"identity", "backbone", "weights", "configured"}, from `serving.served_model`) says which model
    embedded add_ids, so the index worker can switch search to it without loading that model itself.
    """
    added = 0
    with index_writer_lock():
        rows = list(
            ProductImage.objects.filter(id__in=add_ids, embedding__isnull=False)
            .exclude(status=Status.FAILED)
            .values_list("id", "model_identity", "embedding", "status")
        )
        gone = set(add_ids) - {pk for pk, _, _, _ in rows}
        remove = sorted(set(remove_ids) | gone)
        by_identity: dict[str, list[tuple[int, bytes]]] = {}
        for pk, identity, blob, status in rows:
            if status == Status.INDEXED:
                index = _writer_index(identity, None)
                if index is not None and index.contains(pk):
                    continue  # a repeated task: already there, nothing to publish
            by_identity.setdefault(identity, []).append((pk, blob))

        touched: dict[str, VectorIndex] = {}
        for identity, group in by_identity.items():
            ids, vectors = _vectors(group)
            index = _writer_index(identity, vectors.shape[1])
            index.upsert(ids, vectors)
            touched[identity] = index
            added += len(ids)
        if remove:
            for identity in _known_identities():
                index = touched.get(identity) or _writer_index(identity, None)
                if index is not None and index.remove(np.array(remove, dtype=np.int64)):
                    touched[identity] = index
        try:
            for index in touched.values():
                _publish(index)
        except BaseException:
            # The writer's copies now hold changes no published file holds (a full disk, say): the retry
            # must start again from the published versions, or it would find nothing left to do.
            for identity in touched:
                _writer_indexes.pop(str(index_directory(settings.INDEX_DIR, identity)))
            raise
        for identity, group in by_identity.items():
            ProductImage.objects.filter(id__in=[pk for pk, _ in group], model_identity=identity).exclude(
                status=Status.FAILED
            ).update(status=Status.INDEXED, error="", updated_at=timezone.now())
        if model is not None and model["identity"] in by_identity:
            maybe_activate(model)
    return {"added": added, "removed": len(remove), "published": sorted(touched)}


def _known_identities() -> list[str]:
    root = Path(settings.INDEX_DIR)
    identities = []
    if root.exists():
        for entry in root.iterdir():
            if entry.is_dir():
                try:
                    identities.append(read_manifest(entry)["identity"])
                except IndexFileError:
                    continue
    return identities


# ----- keeping nothing lost ----------------------------------------------------------------------

def images_queue_embedding(*, image_ids: list[int]) -> int:
    """Queue images for embedding in batches; returns how many batches were queued."""
    queued = 0
    for start in range(0, len(image_ids), settings.EMBED_BATCH_SIZE):
        if enqueue("embed_images", image_ids=image_ids[start:start + settings.EMBED_BATCH_SIZE]):
            queued += 1
    return queued


def images_requeue_stale() -> dict:
    """Queue again images stuck pending or processing (a lost message, a broker outage, a dead worker)."""
    if queue_backlog("embed"):
        return {"requeued": 0}  # work is flowing: queued images are not stale, only waiting
    cutoff = timezone.now() - datetime.timedelta(seconds=settings.STALE_IMAGE_SECONDS)
    stale = list(
        ProductImage.objects.filter(status__in=[Status.PENDING, Status.PROCESSING], updated_at__lt=cutoff)
        .order_by("id").values_list("id", flat=True)[:10_000]
    )
    if stale:
        ProductImage.objects.filter(id__in=stale).update(updated_at=timezone.now())
        images_queue_embedding(image_ids=stale)
    return {"requeued": len(stale)}


def images_reembed_for_current_model() -> int:
    """Queue every image not yet embedded by the configured model (after a backbone switch)."""
    identity = get_embedder().identity.key
    ids = list(
        ProductImage.objects.exclude(status=Status.FAILED).exclude(model_identity=identity)
        .order_by("id").values_list("id", flat=True)
    )
    images_queue_embedding(image_ids=ids)
    return len(ids)


# ----- rebuild and verify ------------------------------------------------------------------------

def index_rebuild() -> dict:
    """Rebuild the configured model's index from the database and publish it atomically.

    Images the configured model has not embedded yet are queued for embedding; they join the index
    as they are done.
    """
    model = get_embedder()
    identity = model.identity.key
    queued = images_reembed_for_current_model()
    with index_writer_lock():
        index = _build_from_database(identity)
        if index is None:
            return {"identity": identity, "indexed": 0, "queued_for_embedding": queued}
        save_index(index, index_directory(settings.INDEX_DIR, identity))
        _writer_indexes.put(str(index_directory(settings.INDEX_DIR, identity)), index, stamp=index.version)
        ProductImage.objects.filter(id__in=[int(i) for i in index.ids()]).exclude(status=Status.INDEXED).update(
            status=Status.INDEXED, error="", updated_at=timezone.now()
        )
        maybe_activate(served_model(model))
    return {"identity": identity, "indexed": len(index), "kind": index.kind, "version": index.version,
            "queued_for_embedding": queued}


def index_verify(*, repair: bool) -> dict:
    """Compare the configured model's index with the database; with repair, fix every difference."""
    model = get_embedder()
    identity = model.identity.key
    with index_writer_lock():
        index = _writer_index(identity, None)
        in_index = set(int(i) for i in index.ids()) if index is not None else set()
    in_database = {pk for pk, _ in _embedded_rows(identity)}
    missing, orphans = sorted(in_database - in_index), sorted(in_index - in_database)
    report = {"identity": identity, "in_database": len(in_database), "in_index": len(in_index),
              "missing": missing, "orphans": orphans, "repaired": False}
    if repair and (missing or orphans):
        index_apply(add_ids=missing, remove_ids=orphans, model=served_model(model))
        report["repaired"] = True
    if repair:
        report["requeued"] = images_requeue_stale()["requeued"]
    return report
