"""Publishing a vector index in a directory, and following it: a base, delta segments, one manifest.

``manifest.json`` is the one atomic pointer: it names the base (a generation of files, read
memory-mapped) and the delta segments written since, in order. An update writes one small segment and a
new manifest (O(batch)); a reader that follows the manifest applies the new segments to what it holds and
never reloads the base for them. A compaction or a rebuild writes the next base generation beside the old
one and swaps it in with a manifest that keeps the segments written meanwhile. Every file is written to a
temporary name, fsynced and renamed, the manifest last, so a crash at any step leaves the previous state
readable; files no manifest names any more are deleted after a grace period.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ml.files import atomic_write, exclusive_lock
from ml.index import VectorIndex, gpu_count
from ml.index_base import BaseIndex
from ml.index_build import compact
from ml.index_terms import DEFAULT_EXACT_THRESHOLD, FLAT, REBUILD_HINT, IndexFileError, as_ids
from ml.segments import Overlay, Segment, read_segment, segment_name, write_segment

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = 2
GRACE_SECONDS = 300.0  # an unreferenced file lives this long, so readers opening it can finish
_BASE_FILE = re.compile(r"^base-(\d+)\.")

Step = Callable[[str], None]  # told each step as it completes: tests kill the writer between steps


def index_directory(root, identity: str) -> Path:
    """The directory that holds the index of one model identity under ``root``."""
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]+", "-", identity)


def read_manifest(directory) -> dict:
    """The current manifest of an index directory: one small JSON read, cheap to poll."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise IndexFileError(f"no index has been published in {path.parent}; build one with `manage.py reindex`")
    except (OSError, ValueError) as exc:
        raise IndexFileError(f"index manifest {path} is unreadable ({exc}); {REBUILD_HINT}") from exc
    missing = {"identity", "dimension", "version", "generation", "base", "segments", "next_seq"} - set(manifest)
    if missing or manifest.get("format") != FORMAT:
        raise IndexFileError(
            f"index manifest {path} is not one this version understands (missing {sorted(missing)}, "
            f"format {manifest.get('format')!r}); {REBUILD_HINT}"
        )
    return manifest


def load_index(directory, *, expected_identity: str | None = None, manifest: dict | None = None,
               use_gpu: bool | None = None, hash_base: bool = True) -> VectorIndex:
    """The published index: its base memory-mapped, its segments applied.

    Raises ``IndexFileError`` for a missing, truncated or corrupt file, a file that does not match its
    manifest, or an identity other than ``expected_identity``. ``use_gpu`` (default: when faiss sees a
    GPU) moves unfiltered exact scans to GPUs. Without ``hash_base``, the base's files are checked by size
    and structure but not hashed (segments always are).
    """
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    _check_identity(directory, manifest, expected_identity)
    base = BaseIndex.read(directory, manifest["base"], manifest["dimension"], verify=hash_base)
    if use_gpu if use_gpu is not None else gpu_count() > 0:
        base.move_search_to_gpu()
    # The base holds every change up to the sequence number it folded in: the overlay starts after it.
    overlay = Overlay(manifest["dimension"], exact=base.kind == FLAT, last_seq=manifest["base"].get("folded_through", 0))
    index = VectorIndex(manifest["identity"], manifest["dimension"], base=base, overlay=overlay,
                        exact_threshold=manifest.get("exact_threshold", DEFAULT_EXACT_THRESHOLD))
    index.generation = manifest["generation"]
    return _with_segments(index, directory, manifest)


def _with_segments(index: VectorIndex, directory: Path, manifest: dict) -> VectorIndex:
    """``index`` with the manifest's segments it lacks applied; a new object.

    ``index`` stands on the manifest's base, or on the one before it when it is already past the sequence
    number the manifest's base folded in (then it keeps its own generation).
    """
    overlay = index.overlay.applied([
        read_segment(directory, entry, identity=manifest["identity"], dim=manifest["dimension"])
        for entry in manifest["segments"] if entry["seq"] > index.overlay.last_seq
    ])
    updated = VectorIndex(index.identity, index.dim, base=index.base, overlay=overlay,
                          exact_threshold=index.exact_threshold)
    updated.version = manifest["version"]
    updated.generation = index.generation if index.generation is not None else manifest["generation"]
    return updated


def _check_identity(directory: Path, manifest: dict, expected: str | None) -> None:
    if expected is not None and manifest["identity"] != expected:
        raise IndexFileError(
            f"index in {directory} was built for model {manifest['identity']!r}, but this service "
            f"embeds with {expected!r}; {REBUILD_HINT} for the current model"
        )


def save_index(index: VectorIndex, directory, *, grace_seconds: float = GRACE_SECONDS,
               on_step: Step | None = None) -> dict:
    """Publish all of ``index`` as the next base generation (a full publish: the overlay folded in first).

    A directory holds one model identity: saving another identity there is refused. Returns the manifest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = index.base
    if len(index.overlay) or index.overlay.masked.size:
        base, _ = compact(index)
    with exclusive_lock(directory / ".lock"):
        current = _try_read_manifest(directory)
        if current is not None and current["identity"] != index.identity:
            raise IndexFileError(
                f"{directory} holds the index of model {current['identity']!r}, not {index.identity!r}; "
                "give each model identity its own index directory (see index_directory())"
            )
        manifest = _publish_base(directory, index.identity, index.dim, base, current, keep_after=None,
                                 exact_threshold=index.exact_threshold, on_step=on_step)
        _prune(directory, manifest, grace_seconds)
    index.base = base
    index._set_overlay(Overlay(index.dim, exact=base.kind == FLAT))
    index.version, index.generation = manifest["version"], manifest["generation"]
    return manifest


def _publish_base(directory: Path, identity: str, dim: int, base: BaseIndex, current: dict | None, *,
                  keep_after: int | None, exact_threshold: int, on_step: Step | None) -> dict:
    """Write ``base`` as the next generation and a manifest naming it, with the current manifest's segments
    after ``keep_after`` (None: none). The caller holds the directory's lock."""
    step = on_step or (lambda name: None)
    # Past the manifest and any generation a crashed writer left behind unpublished.
    generation = 1 + max([current["generation"] if current else 0, *_generations_on_disk(directory)])
    entry = base.write(directory, generation)
    step("base written")
    segments = [s for s in (current["segments"] if current else []) if keep_after is not None and s["seq"] > keep_after]
    # A reader already past this sequence number may keep its old base (and the segments after it) until the
    # new one has loaded: the two give the same answers.
    entry["folded_through"] = keep_after if keep_after is not None else (current["next_seq"] - 1 if current else 0)
    manifest = {
        "format": FORMAT, "identity": identity, "dimension": dim, "exact_threshold": exact_threshold,
        "version": (current["version"] if current else 0) + 1, "generation": generation, "base": entry,
        "segments": segments, "next_seq": current["next_seq"] if current else 1,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_manifest(directory, manifest)
    step("manifest written")
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write(directory / MANIFEST_NAME, lambda f: f.write(json.dumps(manifest, separators=(",", ":")).encode()))


def _try_read_manifest(directory: Path) -> dict | None:
    try:
        return read_manifest(directory)
    except IndexFileError:
        return None


class IndexWriter:
    """The single writer's view of one identity's directory: appends segments, swaps in new bases.

    Its copy of the index follows the manifest, so another process's compaction or rebuild is picked up
    before the next write.
    """

    def __init__(self, directory, identity: str, dim: int, *, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                 on_step: Step | None = None) -> None:
        self.directory = Path(directory)
        self.identity = identity
        self.dim = int(dim)
        self.exact_threshold = exact_threshold
        self.on_step = on_step or (lambda name: None)
        self.index: VectorIndex | None = None
        self._lock = threading.Lock()

    def current(self) -> VectorIndex:
        """The published index as it is now (an empty one before anything was published)."""
        manifest = _try_read_manifest(self.directory)
        if manifest is None:
            if self.directory.joinpath(MANIFEST_NAME).exists():
                raise IndexFileError(f"the index manifest in {self.directory} is unusable; {REBUILD_HINT}")
            if self.index is None or self.index.version is not None:
                self.index = VectorIndex(self.identity, self.dim, exact_threshold=self.exact_threshold)
            return self.index
        _check_identity(self.directory, manifest, self.identity)
        if self.index is None or self.index.generation != manifest["generation"]:
            self.index = load_index(self.directory, manifest=manifest, use_gpu=False)
        elif self.index.version != manifest["version"]:
            self.index = _with_segments(self.index, self.directory, manifest)
        return self.index

    def apply(self, *, add_ids, vectors, remove_ids) -> dict:
        """Publish one segment: ``add_ids`` added or replaced with ``vectors``, ``remove_ids`` removed."""
        with self._lock, exclusive_lock(self._lock_path()):
            index = self.current()
            add_ids, vectors = index.checked_batch(add_ids, vectors) if len(add_ids) else \
                (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
            remove_ids = np.setdiff1d(as_ids(remove_ids), add_ids)
            manifest = _try_read_manifest(self.directory)
            if manifest is None:  # the first write: an empty base to stand on
                manifest = _publish_base(self.directory, self.identity, self.dim, index.base, None, keep_after=None,
                                         exact_threshold=self.exact_threshold, on_step=None)
            seq = manifest["next_seq"]
            segment = Segment(seq, add_ids, np.asarray(vectors, dtype=np.float32), remove_ids)
            digest = write_segment(self.directory, segment, self.identity)
            self.on_step("segment written")
            manifest = {
                **manifest, "version": manifest["version"] + 1, "next_seq": seq + 1,
                "segments": [*manifest["segments"], {"seq": seq, "file": segment_name(seq), "sha256": digest.sha256,
                                                     "size": digest.size, "added": len(add_ids),
                                                     "removed": len(remove_ids)}],
            }
            _write_manifest(self.directory, manifest)
            self.on_step("manifest written")
            index = _with_segments(index, self.directory, manifest)
            self.index = index
            return manifest

    def replace_base(self, build: Callable[[VectorIndex], BaseIndex], *, fresh: bool = False,
                     grace_seconds: float = GRACE_SECONDS) -> dict:
        """Swap in the base ``build`` makes from the index as it is now (a compaction), or, ``fresh``, from
        elsewhere (a rebuild from the database, which also replaces an unusable index).

        The build runs outside the lock, so updates go on meanwhile; the new manifest keeps the segments
        written after the snapshot, whose changes apply on top of the new base as they did on the old.
        """
        with self._lock, exclusive_lock(self._lock_path()):
            manifest = _try_read_manifest(self.directory)
            if fresh:
                snapshot = VectorIndex(self.identity, self.dim, exact_threshold=self.exact_threshold)
                keep_after = manifest["next_seq"] - 1 if manifest is not None else None
            else:
                snapshot = self.current()
                keep_after = snapshot.overlay.last_seq if manifest is not None else None
        base = build(snapshot)
        self.on_step("base built")
        with self._lock, exclusive_lock(self._lock_path()):
            current = _try_read_manifest(self.directory)
            if current is not None and manifest is not None and current["generation"] != manifest["generation"]:
                raise IndexFileError(f"another base was published in {self.directory} meanwhile; nothing swapped")
            published = _publish_base(self.directory, self.identity, self.dim, base, current, keep_after=keep_after,
                                      exact_threshold=self.exact_threshold, on_step=self.on_step)
            self.index = None
            self.current()
            _prune(self.directory, published, grace_seconds)
            return published

    def _lock_path(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / ".lock"


class IndexReader:
    """Holds the current published index of a directory and follows the manifest.

    ``current()`` checks the manifest at most every ``check_interval`` seconds. New segments are applied
    to what it holds (the base is not read again); a new base generation is opened memory-mapped. The
    swap replaces one reference, so searches already running keep the object they started with. A new
    version that fails to load is logged and skipped while the previous one keeps serving.

    A reader checks a base's files by size and structure but does not hash them: at 1M vectors that is
    gigabytes read by every searching process after every compaction, competing with its searches. The
    writer hashed them as it wrote them and hashes them again whenever it opens a base, so a corrupt file is
    found there, in the index worker, and logged.
    """

    def __init__(self, directory, *, expected_identity: str | None = None, check_interval: float = 0.5) -> None:
        self.directory = Path(directory)
        self.expected_identity = expected_identity
        self.check_interval = check_interval
        self._index: VectorIndex | None = None
        self._checked_at = -math.inf
        self._manifest_stat: tuple | None = None
        self._refused: int | None = None  # the version that failed to load
        self._lock = threading.Lock()
        self._loading: threading.Thread | None = None  # a new base generation, opened in the background

    def current(self) -> VectorIndex:
        # Before the first version is in, every thread waits for the one loading it.
        if self._index is None or time.monotonic() - self._checked_at >= self.check_interval:
            self.refresh(wait=self._index is None)
        index = self._index
        if index is None:
            raise IndexFileError(f"no usable index in {self.directory}; build one with `manage.py reindex`")
        return index

    def refresh(self, *, wait: bool = True) -> bool:
        """Check the manifest now; returns whether a new version was swapped in."""
        if not self._lock.acquire(blocking=wait):
            return False  # another thread is checking; keep serving the current version
        try:
            self._checked_at = time.monotonic()
            try:
                stat = os.stat(self.directory / MANIFEST_NAME)
            except FileNotFoundError:
                if self._index is None:
                    raise IndexFileError(
                        f"no index has been published in {self.directory}; build one with `manage.py reindex`"
                    ) from None
                return False
            key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if key == self._manifest_stat:
                return False
            manifest = read_manifest(self.directory)
            held = self._index
            if held is not None and manifest["version"] in (held.version, self._refused):
                self._manifest_stat = key
                return False
            try:
                _check_identity(self.directory, manifest, self.expected_identity)
                if held is not None and held.generation == manifest["generation"]:
                    index = _with_segments(held, self.directory, manifest)
                elif held is not None and held.overlay.last_seq >= manifest["base"].get("folded_through", math.inf):
                    # Keep serving the old base with the new segments; the new base opens meanwhile.
                    index = _with_segments(held, self.directory, manifest)
                    self._open_in_background(manifest)
                else:
                    index = load_index(self.directory, manifest=manifest, hash_base=False)
            except IndexFileError:
                if held is None:
                    raise
                log.exception("keeping index version %s: version %s failed to load", held.version,
                              manifest["version"])
                self._refused = manifest["version"]
                self._manifest_stat = key
                return False
            self._index = index
            self._manifest_stat = key
            log.debug("loaded index %s", index)
            return True
        finally:
            self._lock.release()

    def _open_in_background(self, manifest: dict) -> None:
        if self._loading is not None and self._loading.is_alive():
            return

        def open_new_base() -> None:
            try:
                opened = load_index(self.directory, manifest=manifest, hash_base=False)
            except IndexFileError:
                log.exception("keeping the index's previous base: generation %s failed to load",
                              manifest["generation"])
                return
            with self._lock:
                latest = _try_read_manifest(self.directory)
                if latest is not None and latest["generation"] == opened.generation:
                    opened = _with_segments(opened, self.directory, latest)
                held = self._index
                if held is not None and held.generation != opened.generation and (
                        opened.overlay.last_seq >= held.overlay.last_seq):
                    self._index = opened
                    log.info("opened index base generation %s", opened.generation)

        self._loading = threading.Thread(target=open_new_base, name="index-base", daemon=True)
        self._loading.start()


# ----- files no manifest names -----------------------------------------------------------------


def _generations_on_disk(directory: Path) -> list[int]:
    return [int(match.group(1)) for entry in os.scandir(directory) if (match := _BASE_FILE.match(entry.name))]


def _prune(directory: Path, manifest: dict, grace_seconds: float) -> None:
    """Delete base and segment files the manifest no longer names, once the grace period has passed.

    A memory-mapped file stays readable by the processes that mapped it after it is deleted.
    """
    named = {part["name"] for part in manifest["base"]["files"].values()} | {s["file"] for s in manifest["segments"]}
    now = time.time()
    for entry in os.scandir(directory):
        stale = entry.name.endswith((".vsd", ".faiss", ".npy")) and entry.name not in named
        temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        if stale or temporary:
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= (grace_seconds if stale else max(grace_seconds, 3600.0)):
                    os.unlink(entry.path)
