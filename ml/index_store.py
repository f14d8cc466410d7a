"""Publishing a vector index in versions, and reading the current version back.

An index directory holds versioned files ``index-<version>.vsi`` and a ``manifest.json``
naming the current one. Every file is written to a temporary name, fsynced, renamed over,
and the directory fsynced; the manifest is written last, so a reader that follows it never
sees a half-written index. ``IndexReader`` polls the manifest and swaps in a new version
without a restart.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO

import faiss

from ml.files import atomic_write, exclusive_lock, file_sha256
from ml.index import FLAT, FORMAT, REBUILD_HINT, IndexFileError, VectorIndex, gpu_count

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_MAGIC = b"VSINDEX\x01"
_FILE_PATTERN = re.compile(r"^index-(\d+)\.vsi$")


def save_index(index: VectorIndex, directory, *, keep: int = 2, grace_seconds: float = 300.0) -> dict:
    """Publish ``index`` as the next version in ``directory``; returns the new manifest.

    Versions older than the newest ``keep`` are deleted once they have been
    superseded for ``grace_seconds`` (readers still opening them get time to finish).
    A directory holds one model identity: saving another identity there is refused.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory / ".lock"):
        current = _try_read_manifest(directory)
        if current is not None and current.get("identity") != index.identity:
            raise IndexFileError(
                f"{directory} holds the index of model {current.get('identity')!r}, not {index.identity!r}; "
                "give each model identity its own index directory (see index_directory())"
            )
        # Past the manifest and any file a crashed writer renamed in but never published.
        version = 1 + max(_published_versions(directory)[-1:] + [int(current["version"]) if current else 0])
        name = f"index-{version:08d}.vsi"
        header = index.header(version)
        digest = atomic_write(directory / name, lambda f: _write_container(f, header, index.parts()))
        manifest = {
            **header,
            "file": name,
            "sha256": digest.sha256,
            "size": digest.size,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write(directory / MANIFEST_NAME, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        index.version = version
        _prune(directory, keep=max(1, keep), grace_seconds=grace_seconds)
    return manifest


def load_index(
    directory,
    *,
    expected_identity: str | None = None,
    manifest: dict | None = None,
    use_gpu: bool | None = None,
) -> VectorIndex:
    """Load the version the directory's manifest names (or ``manifest``, if given).

    Raises ``IndexFileError`` for a missing, truncated or corrupt file, a file that
    does not match its manifest, or an identity other than ``expected_identity``.
    ``use_gpu`` (default: when faiss sees a GPU) moves unfiltered exact searching to GPUs.
    """
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    if expected_identity is not None and manifest["identity"] != expected_identity:
        raise IndexFileError(
            f"index in {directory} was built for model {manifest['identity']!r}, but this service "
            f"embeds with {expected_identity!r}; {REBUILD_HINT} for the current model"
        )
    path = directory / manifest["file"]
    _verify_file(path, manifest)
    try:
        with open(path, "rb") as f:
            header, parts = _read_container(f)
    except (OSError, RuntimeError, ValueError, struct.error) as exc:
        raise IndexFileError(f"index file {path} is corrupt ({exc}); {REBUILD_HINT}") from exc
    for key in ("identity", "dimension", "kind", "count", "version"):
        if header.get(key) != manifest.get(key):
            raise IndexFileError(
                f"index file {path} does not match {directory / MANIFEST_NAME}: {key} is "
                f"{header.get(key)!r} in the file and {manifest.get(key)!r} in the manifest; {REBUILD_HINT}"
            )
    try:
        index = VectorIndex.from_parts(header, parts, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"index file {path} has an unreadable header ({exc!r}); {REBUILD_HINT}") from exc
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if use_gpu:
        index.move_search_to_gpu()
    return index


def _write_container(f: BinaryIO, header: dict, parts: list) -> None:
    encoded = json.dumps(header).encode()
    f.write(_MAGIC + struct.pack("<I", len(encoded)) + encoded)
    writer = faiss.PyCallbackIOWriter(f.write)
    for part in parts:
        faiss.write_index(part, writer)


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
    missing = {"identity", "dimension", "kind", "count", "version", "file", "sha256", "size"} - set(manifest)
    if missing or manifest.get("format") != FORMAT:
        raise IndexFileError(
            f"index manifest {path} is not one this version understands (missing {sorted(missing)}, "
            f"format {manifest.get('format')!r}); {REBUILD_HINT}"
        )
    return manifest


class IndexReader:
    """Holds the current published index of a directory and swaps in new versions.

    ``current()`` checks the manifest at most every ``check_interval`` seconds and loads
    a new version when it appears. The swap replaces one reference, so searches already
    running keep the object they started with. A new version that fails to load is
    logged and skipped while the previous one keeps serving.
    """

    def __init__(self, directory, *, expected_identity: str | None = None, check_interval: float = 0.5) -> None:
        self.directory = Path(directory)
        self.expected_identity = expected_identity
        self.check_interval = check_interval
        self._index: VectorIndex | None = None
        self._checked_at = -math.inf
        self._manifest_stat: tuple | None = None
        self._refused: tuple | None = None  # (version, sha256) that failed to load
        self._lock = threading.Lock()

    def current(self) -> VectorIndex:
        if time.monotonic() - self._checked_at >= self.check_interval:
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
            attempt = (manifest["version"], manifest["sha256"])
            if self._index is not None and (manifest["version"] == self._index.version or attempt == self._refused):
                self._manifest_stat = key
                return False
            try:
                index = load_index(self.directory, expected_identity=self.expected_identity, manifest=manifest)
            except IndexFileError:
                if self._index is None:
                    raise
                log.exception("keeping index version %s: version %s failed to load", self._index.version, attempt[0])
                self._refused = attempt
                self._manifest_stat = key
                return False
            self._index = index
            self._manifest_stat = key
            log.info("loaded index %s", index)
            return True
        finally:
            self._lock.release()


def _try_read_manifest(directory: Path) -> dict | None:
    try:
        return read_manifest(directory)
    except IndexFileError:
        return None


def _published_versions(directory: Path) -> list[int]:
    versions = []
    for entry in os.scandir(directory):
        match = _FILE_PATTERN.match(entry.name)
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def _prune(directory: Path, *, keep: int, grace_seconds: float) -> None:
    """Delete versions older than the newest ``keep`` once superseded for the grace period."""
    now = time.time()
    versions = _published_versions(directory)
    paths = [directory / f"index-{v:08d}.vsi" for v in versions]
    for older, newer in zip(paths[:-keep], paths[1:]):
        with contextlib.suppress(FileNotFoundError):
            if now - newer.stat().st_mtime >= grace_seconds:
                older.unlink()
    for entry in os.scandir(directory):  # temporary files of writers that died mid-write
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= max(grace_seconds, 3600.0):
                    os.unlink(entry.path)


def _verify_file(path: Path, manifest: dict) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IndexFileError(f"index file {path} named by its manifest is missing; {REBUILD_HINT}") from None
    if size != manifest["size"]:
        raise IndexFileError(
            f"index file {path} is truncated or altered ({size} bytes, the manifest says {manifest['size']}); "
            f"{REBUILD_HINT}"
        )
    if file_sha256(path) != manifest["sha256"]:
        raise IndexFileError(f"index file {path} is corrupt (sha256 mismatch); {REBUILD_HINT}")


def _read_container(f: BinaryIO) -> tuple[dict, list]:
    if f.read(len(_MAGIC)) != _MAGIC:
        raise ValueError("not a visualsearch index file")
    (length,) = struct.unpack("<I", f.read(4))
    header = json.loads(f.read(length))
    if header.get("format") != FORMAT:
        raise ValueError(f"unknown format {header.get('format')!r}")
    reader = faiss.PyCallbackIOReader(f.read)
    parts = [faiss.read_index(reader) for _ in range(1 if header.get("kind") == FLAT else 2)]
    if f.read(1):
        raise ValueError("trailing bytes after the index data")
    return header, parts
