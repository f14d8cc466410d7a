"""Delta segments: what changed since an index's base, written in O(batch) and applied by every reader.

A segment file holds the vectors a batch added or replaced and the ids it removed. Applied in order on
top of a base they make the ``Overlay``: the live vectors added since the base, and the ids the base must
no longer answer for (replaced or removed). An overlay never changes; applying a segment gives a new one,
so a search that started on the old overlay finishes on it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ml.files import FileDigest, atomic_write, file_sha256
from ml.index_terms import REBUILD_HINT, IndexFileError, as_ids, normalized

SEGMENT_MAGIC = b"VSDELTA1"
SEGMENT_FORMAT = 1


@dataclass(frozen=True)
class Segment:
    seq: int
    ids: np.ndarray  # int64: vectors added or replaced
    vectors: np.ndarray  # float32 (len(ids), dim), unit length
    removed: np.ndarray  # int64


def segment_name(seq: int) -> str:
    return f"delta-{seq:08d}.vsd"


def write_segment(directory: Path, segment: Segment, identity: str) -> FileDigest:
    """Write one segment file whole (temporary name, fsync, rename)."""
    header = json.dumps({
        "format": SEGMENT_FORMAT, "seq": segment.seq, "identity": identity, "dimension": segment.vectors.shape[1],
        "added": len(segment.ids), "removed": len(segment.removed),
    }).encode()

    def write(f) -> None:
        f.write(SEGMENT_MAGIC + struct.pack("<I", len(header)) + header)
        f.write(np.ascontiguousarray(segment.ids, dtype="<i8").tobytes())
        f.write(np.ascontiguousarray(segment.vectors, dtype="<f4").tobytes())
        f.write(np.ascontiguousarray(segment.removed, dtype="<i8").tobytes())

    return atomic_write(directory / segment_name(segment.seq), write)


def read_segment(directory: Path, entry: dict, *, identity: str, dim: int) -> Segment:
    """The segment a manifest entry names; ``IndexFileError`` unless it is whole and what the entry says."""
    path = directory / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexFileError(f"index segment {path} named by its manifest is missing; {REBUILD_HINT}") from None
    if len(data) != entry["size"] or file_sha256(path) != entry["sha256"]:
        raise IndexFileError(f"index segment {path} is truncated or corrupt; {REBUILD_HINT}")
    try:
        if not data.startswith(SEGMENT_MAGIC):
            raise ValueError("not a visualsearch index segment")
        (length,) = struct.unpack_from("<I", data, len(SEGMENT_MAGIC))
        start = len(SEGMENT_MAGIC) + 4
        header = json.loads(data[start : start + length])
        added, removed = int(header["added"]), int(header["removed"])
        if (header.get("format"), header.get("identity"), header.get("dimension"), header.get("seq")) != (
            SEGMENT_FORMAT, identity, dim, entry["seq"]
        ):
            raise ValueError(f"its header {header} does not match the manifest")
        offset = start + length
        ids = np.frombuffer(data, "<i8", added, offset)
        offset += 8 * added
        vectors = np.frombuffer(data, "<f4", added * dim, offset).reshape(added, dim)
        offset += 4 * added * dim
        gone = np.frombuffer(data, "<i8", removed, offset)
        if offset + 8 * removed != len(data):
            raise ValueError("its length does not match its header")
    except (ValueError, KeyError, struct.error) as exc:
        raise IndexFileError(f"index segment {path} is unreadable ({exc}); {REBUILD_HINT}") from exc
    return Segment(seq=int(entry["seq"]), ids=ids.astype(np.int64), vectors=vectors, removed=gone.astype(np.int64))


class Overlay:
    """The vectors added since a base (their ids sorted), and the ids the base must not answer for.

    Over an exact base the vectors are kept in fp32, so search stays exact; over an approximate one in
    fp16: half the memory of each searching process, and still finer than the base's own codes.
    """

    def __init__(self, dim: int, *, exact: bool = True, ids: np.ndarray | None = None,
                 codes: np.ndarray | None = None, masked: np.ndarray | None = None, last_seq: int = 0) -> None:
        self.dim = dim
        self.exact = exact
        self.ids = np.zeros(0, np.int64) if ids is None else ids
        self.codes = np.zeros((0, self._codec().code_size), np.uint8) if codes is None else codes
        self.masked = np.zeros(0, np.int64) if masked is None else masked
        self.last_seq = last_seq
        self._index: faiss.Index | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def changed(self, *, add_ids: np.ndarray, add_vectors: np.ndarray, remove_ids: np.ndarray,
                seq: int | None = None) -> Overlay:
        """A new overlay with these changes after this one's (removals first, then additions)."""
        add_ids, remove_ids = as_ids(add_ids), as_ids(remove_ids)
        touched = np.union1d(add_ids, remove_ids)
        keep = ~np.isin(self.ids, touched)
        ids = np.concatenate([self.ids[keep], add_ids])
        codes = self.codes[keep]
        if len(add_ids):
            codes = np.concatenate([codes, self._codec().sa_encode(normalized(add_vectors))])
        order = np.argsort(ids, kind="stable")
        return Overlay(self.dim, exact=self.exact, ids=ids[order], codes=codes[order],
                       masked=np.union1d(self.masked, touched), last_seq=self.last_seq if seq is None else seq)

    def vectors(self) -> np.ndarray:
        """The overlay's vectors, decoded, in the order of ``ids``."""
        return self._codec().sa_decode(self.codes) if len(self.ids) else np.zeros((0, self.dim), np.float32)

    def _codec(self) -> faiss.Index:
        """An empty index that encodes and decodes without training: fp32 (exact) or fp16."""
        if self.exact:
            return faiss.IndexFlatIP(self.dim)
        return faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)

    def applied(self, segments: list[Segment]) -> Overlay:
        """A new overlay with these segments applied in order, in one pass over the overlay's codes."""
        if not segments:
            return self
        latest: dict[int, tuple[int, int]] = {}  # id -> (segment, row) of its last vector
        removed: set[int] = set()
        for number, segment in enumerate(segments):
            for image_id in segment.removed.tolist():
                removed.add(image_id)
                latest.pop(image_id, None)
            for row, image_id in enumerate(segment.ids.tolist()):
                latest[image_id] = (number, row)
                removed.discard(image_id)
        add_ids = np.array(sorted(latest), dtype=np.int64)
        vectors = np.stack([segments[n].vectors[r] for n, r in (latest[i] for i in add_ids.tolist())]) \
            if len(add_ids) else np.zeros((0, self.dim), np.float32)
        return self.changed(add_ids=add_ids, add_vectors=vectors, remove_ids=np.array(sorted(removed), np.int64),
                            seq=segments[-1].seq)

    def contains(self, image_id: int) -> bool:
        position = np.searchsorted(self.ids, image_id)
        return bool(position < len(self.ids) and self.ids[position] == image_id)

    def search(self, queries: np.ndarray, k: int, allow_ids: np.ndarray | None = None):
        """(scores, ids) of the ``k`` best overlay vectors for unit ``queries``; -1 where fewer exist."""
        m = len(queries)
        if len(self.ids) == 0:
            return np.full((m, k), -np.inf, np.float32), np.full((m, k), -1, np.int64)
        params = None
        if allow_ids is not None:
            positions = np.flatnonzero(np.isin(self.ids, allow_ids))
            selector = faiss.IDSelectorBatch(positions.astype(np.int64))
            params = faiss.SearchParameters(sel=selector)
        scores, positions = self._searcher().search(queries, k, params=params)
        return scores, np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)

    def _searcher(self) -> faiss.Index:
        """A faiss index over the codes, built once for this overlay (a copy of the codes, no encoding)."""
        if self._index is None:
            index = self._codec()
            faiss.copy_array_to_vector(np.ascontiguousarray(self.codes).ravel(), index.codes)
            index.ntotal = len(self.ids)
            self._index = index
        return self._index
