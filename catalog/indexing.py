"""The single index writer: embedded and deleted images into each model's index, compaction, rebuild, verify.

Each model identity has its own index directory (ml.index_store). An update publishes one small delta
segment, so its cost follows the batch, not the catalog; once the overlay of segments grows past its
threshold a `compact_index` task folds it into a new base in the background while updates and searches
go on. A rebuild streams the embeddings from the database in chunks, never all at once, and no statement
names the catalog's images one by one.
"""
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from django.conf import settings
from django.utils import timezone

from catalog.duplicates import duplicates_record
from catalog.models import ProductImage, embedding_from_bytes
from catalog.pipeline import images_reembed_for_current_model, images_requeue_stale
from catalog.process_cache import ProcessCache
from catalog.queue import enqueue
from catalog.selectors import embedded_images
from catalog.serving import active_index, get_embedder, maybe_activate, served_model
from ml.files import exclusive_lock
from ml.index_build import build_base, compact
from ml.index_store import IndexWriter, index_directory, read_manifest
from ml.index_terms import IndexFileError

logger = logging.getLogger(__name__)
Status = ProductImage.Status

CHUNK_ROWS = 5_000  # images read per query when streaming embeddings (a few tens of MB at 2048-d)
REPAIR_BATCH = 10_000  # images per segment when repairing
Progress = Callable[[str, int, int], None]

_writers: ProcessCache[str, IndexWriter] = ProcessCache("index writers")
_compaction_asked: ProcessCache[str, int] = ProcessCache("compactions asked for")  # generation -> asked once
_writer_thread_lock = threading.Lock()


@contextlib.contextmanager
def index_writer_lock() -> Iterator[None]:
    """One index writer at a time: across threads of this process and across processes."""
    root = Path(settings.INDEX_DIR)
    root.mkdir(parents=True, exist_ok=True)
    with _writer_thread_lock, exclusive_lock(root / ".writer.lock"):
        yield


def _writer(identity: str, dim: int | None = None) -> IndexWriter | None:
    """The writer of an identity's directory (None when nothing was published and no `dim` is given)."""
    directory = index_directory(settings.INDEX_DIR, identity)
    if dim is None:
        try:
            dim = read_manifest(directory)["dimension"]
        except IndexFileError:
            return None
    return _writers.get(str(directory), lambda: IndexWriter(directory, identity, dim,
                                                            exact_threshold=settings.INDEX_EXACT_THRESHOLD))


def _current(writer: IndexWriter):
    """The published index; an unusable one is rebuilt from the database first."""
    try:
        return writer.current()
    except IndexFileError:
        logger.exception("index %s is unusable; rebuilding it from the database", writer.directory)
        _rebuild(writer)
        return writer.current()


# ----- updates -------------------------------------------------------------------------------------

def index_apply(*, add_ids: list[int], remove_ids: list[int], model: dict | None = None) -> dict:
    """Upsert the embedded images in add_ids and remove remove_ids: one segment per model. Idempotent.

    `model` ({"identity", "backbone", "weights", "configured"}, from `serving.served_model`) says which model
    embedded add_ids, so the index worker can switch search to it without loading that model itself.
    """
    added, removed, published = 0, 0, []
    with index_writer_lock():
        by_identity, found = _embedded_groups(add_ids)
        active = active_index() or model  # the served index, or the model about to be served first
        remove = np.array(sorted(set(remove_ids) | (set(add_ids) - found)), dtype=np.int64)
        for identity in sorted(set(by_identity) | set(_known_identities())):
            group = by_identity.get(identity, [])
            writer = _writer(identity, group[0][1].shape[0] if group else None)
            if writer is None:
                continue
            index = _current(writer)
            adds = [(pk, vector) for pk, vector, status in group
                    if not (status == Status.INDEXED and index.contains(pk))]  # a repeated task: already there
            gone = remove[[index.contains(int(pk)) for pk in remove]] if remove.size else remove
            if adds or gone.size:
                ids = np.array([pk for pk, _ in adds], dtype=np.int64)
                vectors = np.stack([v for _, v in adds]) if adds else np.zeros((0, writer.dim), np.float32)
                writer.apply(add_ids=ids, vectors=vectors, remove_ids=gone)
                if active is not None and identity == active["identity"]:
                    duplicates_record(index=writer.current(), ids=ids, vectors=vectors)
                added, removed = added + len(ids), removed + int(gone.size)
                published.append(identity)
                _ask_for_compaction(writer)
            if group:
                ProductImage.objects.filter(id__in=[pk for pk, _, _ in group], model_identity=identity).exclude(
                    status=Status.FAILED
                ).update(status=Status.INDEXED, error="", updated_at=timezone.now())
        if model is not None and model["identity"] in by_identity:
            maybe_activate(model)
    return {"added": added, "removed": removed, "published": published}


def _embedded_groups(add_ids: list[int]) -> tuple[dict[str, list], set[int]]:
    """{identity: [(id, vector, status)]} of the embedded, not failed images among add_ids, read in chunks."""
    groups: dict[str, list] = {}
    found: set[int] = set()
    for start in range(0, len(add_ids), CHUNK_ROWS):
        rows = (ProductImage.objects.filter(id__in=add_ids[start:start + CHUNK_ROWS], embedding__isnull=False)
                .exclude(status=Status.FAILED).values_list("id", "model_identity", "embedding", "status"))
        for pk, identity, blob, status in rows:
            groups.setdefault(identity, []).append((pk, embedding_from_bytes(blob), status))
            found.add(pk)
    return groups, found


def _known_identities() -> list[str]:
    root = Path(settings.INDEX_DIR)
    identities = []
    if root.exists():
        for entry in root.iterdir():
            if entry.is_dir():
                with contextlib.suppress(IndexFileError):
                    identities.append(read_manifest(entry)["identity"])
    return identities


def _ask_for_compaction(writer: IndexWriter) -> None:
    """Queue a compaction once per base generation, when the overlay has grown past its threshold."""
    index = writer.index
    if index is None or not index.needs_compaction:
        return
    if _compaction_asked.peek(str(writer.directory)) == index.generation:
        return
    _compaction_asked.put(str(writer.directory), index.generation)
    enqueue("compact_index", identity=writer.identity)


# ----- compaction and rebuild ----------------------------------------------------------------------

def index_compact(*, identity: str, force: bool = False) -> dict:
    """Fold an identity's overlay into a new base while updates and searches go on. Idempotent."""
    writer = _writer(identity)
    if writer is None:
        return {"identity": identity, "compacted": False, "why": "nothing is published"}
    directory = Path(writer.directory)
    with exclusive_lock(directory / ".compaction.lock"):
        index = _current(writer)
        if not (force or index.needs_compaction):
            return {"identity": identity, "compacted": False, "why": "the overlay is below its threshold"}
        done = {}

        def build(snapshot):
            # The database's vectors for the exact kind (small, and its fp32 vectors are the truth); the
            # approximate kind keeps its own codes and retrains from the database only when it must.
            base, done["how"] = compact(snapshot, source=_embedding_chunks(identity),
                                        source_against="exact search over the database's vectors")
            return base

        manifest = writer.replace_base(build)
    logger.info("compacted the index of %s: %s", identity, done["how"])
    return {"identity": identity, "compacted": True, "how": done["how"], "generation": manifest["generation"],
            "count": manifest["base"]["count"]}


def _embedding_chunks(identity: str, up_to_id: int | None = None):
    """A stream of (ids, vectors) of the images embedded by `identity`, in id order, CHUNK_ROWS at a time."""

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = 0
        while True:
            rows = embedded_images(identity).filter(id__gt=last)
            if up_to_id is not None:
                rows = rows.filter(id__lte=up_to_id)
            batch = list(rows.order_by("id").values_list("id", "embedding")[:CHUNK_ROWS])
            if not batch:
                return
            ids = np.fromiter((pk for pk, _ in batch), dtype=np.int64, count=len(batch))
            yield ids, np.stack([embedding_from_bytes(blob) for _, blob in batch])
            last = int(ids[-1])

    return chunks


def _rebuild(writer: IndexWriter, on_progress: Progress | None = None) -> dict:
    """A new base built from the database; updates published meanwhile stay on top of it."""
    identity = writer.identity
    last = embedded_images(identity).order_by("-id").values_list("id", flat=True).first()
    if last is None:
        return {}
    count = embedded_images(identity).filter(id__lte=last).count()
    chunks = _embedding_chunks(identity, up_to_id=last)

    def build(snapshot):
        return build_base(chunks, count=count, dim=writer.dim, exact_threshold=settings.INDEX_EXACT_THRESHOLD,
                          on_progress=on_progress, measured_against="exact search over the database's vectors")

    manifest = writer.replace_base(build, fresh=True)
    # Set-based, whatever the catalog's size: every image the stream could have read is in the base now.
    embedded_images(identity).filter(id__lte=last).exclude(status=Status.INDEXED).update(
        status=Status.INDEXED, error="", updated_at=timezone.now()
    )
    return manifest


def index_rebuild(*, on_progress: Progress | None = None) -> dict:
    """Rebuild the configured model's index from the database and publish it atomically.

    Images the configured model has not embedded yet are queued for embedding; they join the index
    as they are done.
    """
    model = get_embedder()
    identity = model.identity.key
    queued = images_reembed_for_current_model()
    writer = _writer(identity, model.dim)
    manifest = _rebuild(writer, on_progress)
    if not manifest:
        return {"identity": identity, "indexed": 0, "queued_for_embedding": queued}
    with index_writer_lock():
        maybe_activate(served_model(model))
    index = writer.current()
    return {"identity": identity, "indexed": len(index), "kind": index.kind, "version": index.version,
            "queued_for_embedding": queued, **index.describe()}


def index_describe(identity: str) -> dict | None:
    """What the published index of `identity` is (kind, size, recall, why it is searched as it is)."""
    writer = _writer(identity)
    if writer is None:
        return None
    try:
        return writer.current().describe()
    except IndexFileError as exc:
        return {"identity": identity, "error": str(exc)}


def index_verify(*, repair: bool) -> dict:
    """Compare the configured model's index with the database; with repair, fix every difference."""
    model = get_embedder()
    identity = model.identity.key
    writer = _writer(identity)
    with index_writer_lock():
        in_index = set(_current(writer).ids().tolist()) if writer is not None else set()
    in_database = set(embedded_images(identity).values_list("id", flat=True).iterator(chunk_size=CHUNK_ROWS))
    missing, orphans = sorted(in_database - in_index), sorted(in_index - in_database)
    report = {"identity": identity, "in_database": len(in_database), "in_index": len(in_index),
              "missing": missing, "orphans": orphans, "repaired": False}
    if repair and (missing or orphans):
        for start in range(0, max(len(missing), len(orphans)), REPAIR_BATCH):
            index_apply(add_ids=missing[start:start + REPAIR_BATCH], remove_ids=orphans[start:start + REPAIR_BATCH],
                        model=served_model(model))
        report["repaired"] = True
    if repair:
        report["requeued"] = images_requeue_stale()["requeued"]
    return report
