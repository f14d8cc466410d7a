"""Embedding many images: reading, decoding and preprocessing in threads while the model runs."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from ml.embedder import Embedder, EmbedResult, ModelIdentity, concatenate
from ml.images import decode_image
from ml.precision import available_cpus

Source = TypeVar("Source")


@dataclass(frozen=True)
class BulkEmbedding(Generic[Source]):
    sources: list[Source]  # the sources that embedded, in the order of ``vectors``
    vectors: np.ndarray
    labels: list[list[tuple[str, float]]]
    failures: list[tuple[Source, str]]  # (source, why it could not be embedded)
    identity: ModelIdentity
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.sources) / self.seconds if self.seconds > 0 else 0.0


def embed_sources(
    embedder: Embedder,
    sources: Iterable[Source],
    *,
    read: Callable[[Source], bytes],
    batch_size: int | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> BulkEmbedding[Source]:
    """Embed many images, reading, decoding and preprocessing them in threads while the model runs.

    ``read`` gives a source's bytes (a file path's contents, a stored object's). A source that
    cannot be read or decoded is reported in ``failures`` and the rest go on.
    ``on_progress(done, failed)`` is called after every batch.
    """
    batch_size = batch_size or embedder.batch_size
    workers = workers or max(1, min(4, available_cpus()))

    def prepare(source: Source) -> np.ndarray:
        image, _ = decode_image(read(source), min_side=embedder.min_side)
        return embedder.preprocess(image)

    started = time.perf_counter()
    done_sources: list[Source] = []
    failures: list[tuple[Source, str]] = []
    results: list[EmbedResult] = []
    batch: list[np.ndarray] = []
    batch_sources: list[Source] = []

    def flush() -> None:
        results.append(embedder.embed_pixels(np.stack(batch)))
        done_sources.extend(batch_sources)
        batch.clear()
        batch_sources.clear()
        if on_progress:
            on_progress(len(done_sources), len(failures))

    remaining = iter(sources)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        # Two batches in flight keep the model fed without holding every image in memory.
        pending: deque[tuple[Source, Future]] = deque()

        def submit_next() -> None:
            for source in remaining:
                pending.append((source, pool.submit(prepare, source)))
                return

        for _ in range(2 * batch_size):
            submit_next()
        while pending:
            source, future = pending.popleft()
            submit_next()
            try:
                pixels = future.result()
            except Exception as e:  # one bad file must not stop the other thousands
                failures.append((source, _failure_reason(e)))
                continue
            batch.append(pixels)
            batch_sources.append(source)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    combined = concatenate(results, embedder.identity)
    return BulkEmbedding(
        sources=done_sources,
        vectors=combined.vectors,
        labels=combined.labels,
        failures=failures,
        identity=embedder.identity,
        seconds=time.perf_counter() - started,
    )


def _failure_reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"cannot read the file: {error.strerror}"
    if isinstance(error, ValueError):  # ImageDecodeError says what is wrong in words
        return str(error)
    return f"{type(error).__name__}: {error}"
