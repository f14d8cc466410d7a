"""The embedding pipeline, from a stored image to a searchable vector.

upload (services.product_image_add) -> embed_images task (images_embed: decode, one forward pass per
batch, store the embedding) -> index_images task (index_apply: the single writer upserts the vectors and
publishes a new index version) -> searching processes pick the version up (search.vector_search).

Each model identity has its own index directory under settings.INDEX_DIR; `active.json` names the one
that search serves. When the configured model changes, every image is re-embedded into the new
identity's index and search switches over only once that index holds every image.
"""
import contextlib
import datetime
import fcntl
import json
import logging
import os
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
from catalog.queue import enqueue
from catalog.selectors import embedded_images
from ml.images import ImageDecodeError, decode_image
from ml.index import IndexFileError, VectorIndex, index_directory, read_manifest

logger = logging.getLogger(__name__)
Status = ProductImage.Status

ACTIVE_FILE = "active.json"


# ----- the model, once per process ---------------------------------------------------------------

_embedders: dict[tuple, object] = {}
_embedder_lock = threading.Lock()


def embedder_spec() -> dict:
    return {"backbone": settings.EMBED_BACKBONE, "weights": settings.EMBED_WEIGHTS}


def get_embedder(spec: dict | None = None):
    """The classifier-embedder for `spec` (default: the configured one), loaded once per process.

    Loading happens on first use, so a prefork worker loads it in each child, never in the parent.
    """
    from ml.embedder import load_embedder

    spec = spec or embedder_spec()
    key = (spec["backbone"], spec["weights"], settings.EMBED_PRECISION, settings.EMBED_FALLBACK)
    with _embedder_lock:
        if key not in _embedders:
            if len(_embedders) >= 2:  # the configured model and, during a switch, the one search serves
                _embedders.pop(next(iter(_embedders)))
            _embedders[key] = load_embedder(
                spec["backbone"], spec["weights"], precision=settings.EMBED_PRECISION,
                fallback=settings.EMBED_FALLBACK,
            )
        return _embedders[key]


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
        _after_embedded(batch=[image for image, _ in batch], vectors=result.vectors, identity=identity)

    to_index = done + embedded
    if to_index:
        from workers.tasks import index_images

        enqueue(index_images, add_ids=to_index, model=_served_model(model))
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


def _after_embedded(*, batch: list[ProductImage], vectors: np.ndarray, identity: str) -> None:
    """Hook for work that rides on the same forward pass (category suggestions)."""
    from catalog.categorizer import suggestions_after_embedding

    suggestions_after_embedding(images=batch, vectors=vectors, identity=identity)


def images_mark_failed(*, image_ids: list[int], reason: str) -> int:
    """The last retry failed: say so on every image of the batch that is not done."""
    return ProductImage.objects.filter(id__in=image_ids).exclude(status=Status.INDEXED).update(
        status=Status.FAILED, error=reason[:2000], updated_at=timezone.now()
    )


# ----- the index writer --------------------------------------------------------------------------

_writer_indexes: dict[str, VectorIndex] = {}
_writer_thread_lock = threading.Lock()


@contextlib.contextmanager
def index_writer_lock() -> Iterator[None]:
    """One index writer at a time: across threads of this process and across processes."""
    root = Path(settings.INDEX_DIR)
    root.mkdir(parents=True, exist_ok=True)
    with _writer_thread_lock, open(root / ".writer.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _writer_index(identity: str, dim: int | None) -> VectorIndex | None:
    """The writer's copy of an identity's index, reloaded if another process published since."""
    directory = index_directory(settings.INDEX_DIR, identity)
    cached = _writer_indexes.get(str(directory))
    try:
        manifest = read_manifest(directory)
    except IndexFileError:
        manifest = None
    if manifest is not None and (cached is None or cached.version != manifest["version"]):
        try:
            cached = VectorIndex.load(directory, expected_identity=identity)
        except IndexFileError:
            logger.exception("index %s is unusable; rebuilding it from the database", directory)
            cached = _build_from_database(identity)
    if cached is None and dim is not None:
        cached = VectorIndex(identity, dim, exact_threshold=settings.INDEX_EXACT_THRESHOLD)
    if cached is not None:
        _writer_indexes[str(directory)] = cached
    return cached


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
    from ml.index import build_index

    ids, vectors = _vectors(_embedded_rows(identity))
    if vectors is None:
        return None
    return build_index(ids, vectors, identity, exact_threshold=settings.INDEX_EXACT_THRESHOLD)


def _publish(index: VectorIndex) -> None:
    directory = index_directory(settings.INDEX_DIR, index.identity)
    if index.needs_rebuild:
        from ml.index import build_index

        ids = index.ids()
        rows = dict(_embedded_rows(index.identity, ids=[int(i) for i in ids]))
        kept = np.array([i for i in ids if int(i) in rows], dtype=np.int64)
        vectors = np.stack([embedding_from_bytes(rows[int(i)]) for i in kept])
        index = build_index(kept, vectors, index.identity, exact_threshold=settings.INDEX_EXACT_THRESHOLD)
    index.save(directory)
    _writer_indexes[str(directory)] = index


def index_apply(*, add_ids: list[int], remove_ids: list[int], model: dict | None = None) -> dict:
    """Upsert the embedded images in add_ids, remove remove_ids, publish. Idempotent.

    `model` ({"identity", "backbone", "weights", "configured"}, from `_served_model`) says which model
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
                _writer_indexes.pop(str(index_directory(settings.INDEX_DIR, identity)), None)
            raise
        for identity, group in by_identity.items():
            ProductImage.objects.filter(id__in=[pk for pk, _ in group], model_identity=identity).exclude(
                status=Status.FAILED
            ).update(status=Status.INDEXED, error="", updated_at=timezone.now())
        if model is not None and model["identity"] in by_identity:
            _maybe_activate(model)
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


# ----- which index search serves -----------------------------------------------------------------

def active_index() -> dict | None:
    """{"identity", "backbone", "weights", "activated_at"} of the index search serves, or None."""
    try:
        return json.loads((Path(settings.INDEX_DIR) / ACTIVE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_active(identity: str, spec: dict) -> None:
    root = Path(settings.INDEX_DIR)
    data = {**spec, "identity": identity, "activated_at": timezone.now().isoformat(timespec="seconds")}
    tmp = root / f".{ACTIVE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / ACTIVE_FILE)
    logger.info("search now serves the index of %s", identity)


def _served_model(model) -> dict:
    """What search needs to embed queries with `model`, and the configuration it was loaded under."""
    return {
        "identity": model.identity.key,
        "backbone": model.identity.backbone,
        # A fallback model is named as what it is, so search loads the same one.
        "weights": "imagenet" if model.fallback_reason else settings.EMBED_WEIGHTS,
        "configured": [settings.EMBED_BACKBONE, settings.EMBED_WEIGHTS],
    }


def _maybe_activate(model: dict) -> None:
    """Serve `model`'s index once it holds every image that can be embedded (or nothing serves yet)."""
    identity = model["identity"]
    active = active_index()
    if active is not None and active["identity"] == identity:
        return
    if model["configured"] != [settings.EMBED_BACKBONE, settings.EMBED_WEIGHTS]:
        return  # a leftover batch of a model configured before: never switch back to it
    behind = ProductImage.objects.exclude(status=Status.FAILED).exclude(
        model_identity=identity, status=Status.INDEXED
    )
    if active is None or not behind.exists():
        _write_active(identity, {"backbone": model["backbone"], "weights": model["weights"]})


# ----- keeping nothing lost ----------------------------------------------------------------------

def images_queue_embedding(*, image_ids: list[int]) -> int:
    """Queue images for embedding in batches; returns how many batches were queued."""
    from workers.tasks import embed_images

    queued = 0
    for start in range(0, len(image_ids), settings.EMBED_BATCH_SIZE):
        if enqueue(embed_images, image_ids=image_ids[start:start + settings.EMBED_BATCH_SIZE]):
            queued += 1
    return queued


def images_requeue_stale() -> dict:
    """Queue again images stuck pending or processing (a lost message, a broker outage, a dead worker)."""
    if _embed_queue_busy():
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


def _embed_queue_busy() -> bool:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return False
    from visualsearch.celery import app

    try:
        with app.connection_for_read() as connection:
            return connection.default_channel.queue_declare(queue="embed", passive=True).message_count > 0
    except Exception:  # the queue does not exist yet, or the broker is down: sweep anyway
        return False


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
        index.save(index_directory(settings.INDEX_DIR, identity))
        _writer_indexes[str(index_directory(settings.INDEX_DIR, identity))] = index
        ProductImage.objects.filter(id__in=[int(i) for i in index.ids()]).exclude(status=Status.INDEXED).update(
            status=Status.INDEXED, error="", updated_at=timezone.now()
        )
        _maybe_activate(_served_model(model))
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
        index_apply(add_ids=missing, remove_ids=orphans, model=_served_model(model))
        report["repaired"] = True
    if repair:
        report["requeued"] = images_requeue_stale()["requeued"]
    return report
