"""What every part of the vector index shares: its kinds, its errors, and checked id and vector arrays."""

from __future__ import annotations

import numpy as np

FLAT = "flat"
APPROXIMATE = "ivf"
KINDS = (FLAT, APPROXIMATE)

DEFAULT_EXACT_THRESHOLD = 50_000
REBUILD_HINT = "rebuild it with `manage.py reindex`"


class IndexFileError(Exception):
    """A published index cannot be used as it is; ``str(e)`` says what to do."""


class DuplicateIdError(ValueError):
    """``add`` was given ids the index already holds (or the same id twice)."""


def as_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of image ids, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers (database image ids), got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if (ids < 0).any():
        raise ValueError(f"ids must be non-negative database ids, got {sample(ids[ids < 0])}")
    return np.ascontiguousarray(ids)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy scaled to unit length; zero or non-finite rows are refused."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    out /= np.sqrt(check_rows(out))[:, None]
    return out


def check_rows(vectors: np.ndarray) -> np.ndarray:
    """Squared norms of the rows, after refusing non-finite and all-zero rows."""
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    squared = np.einsum("ij,ij->i", vectors, vectors)
    if (squared == 0).any():
        raise ValueError(f"{int((squared == 0).sum())} vector(s) are all zeros and have no direction to search by")
    return squared


def sample(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
