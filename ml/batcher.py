"""Dynamic batching of concurrent queries, as inference servers do it: one forward pass for the images of many
requests that arrive within a few milliseconds of each other, instead of one pass per request thread.

Callers preprocess their images themselves, in parallel; only the forward pass is shared. No thread of its
own: the first caller to find no batch forming leads one. It waits for the model to be free,
then up to ``wait_s`` more (or until ``max_images`` are waiting), takes everything waiting, runs it, and
hands each caller its rows. Callers that arrive while a batch runs form the next one, so under load the
batches grow by themselves and when idle a lone query waits at most ``wait_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ml.embedder import EmbedResult


@dataclass
class _Request:
    images: Sequence[np.ndarray]  # each image's model input pixels, from Embedder.preprocess
    maps: bool
    taken: bool = False  # in a batch that a leader runs: its caller only waits for the rows
    done: bool = False
    result: EmbedResult | None = None
    error: BaseException | None = None


class DynamicBatcher:
    def __init__(self, embed_pixels: Callable[..., EmbedResult], *, max_images: int = 8, wait_s: float = 0.003):
        self._embed = embed_pixels  # embed_pixels(uint8 [n, 3, H, W], maps=...) -> EmbedResult: Embedder.embed_pixels
        self.max_images = max_images
        self.wait_s = wait_s
        self._lock = threading.Condition()
        self._waiting: list[_Request] = []
        self._leading = False  # a caller is gathering the next batch
        self._model_free = threading.Lock()
        self.batches = 0  # forward passes run, and the images in them: what batching saved
        self.images = 0

    def embed(self, pixels: Sequence[np.ndarray], *, maps: bool = False) -> EmbedResult:
        """Embed images already preprocessed by the caller (in its own thread, while the model runs others')."""
        request = _Request(list(pixels), maps)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
        while True:
            with self._lock:
                while not request.done and (self._leading or request.taken):
                    self._lock.wait()
                if request.done:
                    break
                self._leading = True
            self._lead()
        if request.error is not None:
            raise request.error
        return request.result

    def _lead(self) -> None:
        with self._model_free:  # while the previous batch runs, the next one keeps gathering
            deadline = time.monotonic() + self.wait_s
            with self._lock:
                while self._count() < self.max_images and (left := deadline - time.monotonic()) > 0:
                    self._lock.wait(left)
                batch, taken = [], 0
                while self._waiting and (not batch or taken + len(self._waiting[0].images) <= self.max_images):
                    request = self._waiting.pop(0)
                    request.taken = True
                    batch.append(request)
                    taken += len(request.images)
                self._leading = False
                self._lock.notify_all()  # a caller still waiting leads the next batch
            self._run(batch)
        with self._lock:
            self._lock.notify_all()  # the callers of this batch find their rows

    def _count(self) -> int:
        return sum(len(request.images) for request in self._waiting)

    def _run(self, batch: list[_Request]) -> None:
        if not batch:
            return
        images = [image for request in batch for image in request.images]
        try:
            result = self._embed(np.stack(images), maps=any(request.maps for request in batch))
            self.batches += 1
            self.images += len(images)
            start = 0
            for request in batch:
                end = start + len(request.images)
                request.result = EmbedResult(
                    result.vectors[start:end], result.labels[start:end], result.identity,
                    result.maps[start:end] if request.maps and result.maps is not None else None)
                start = end
        except Exception as e:  # each caller gets the error
            for request in batch:
                request.error = e
        finally:  # and none is left waiting, whatever happened
            for request in batch:
                request.done = True
