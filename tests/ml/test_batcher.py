"""The dynamic batcher: concurrent callers' images go through the model together, and each gets its own rows."""
import threading
import time

import numpy as np

from ml.batcher import DynamicBatcher
from ml.embedder import EmbedResult, ModelIdentity

IDENTITY = ModelIdentity("test", "0" * 64, 2)


class SlowModel:
    """Each image's vector is its pixel value: a caller given another caller's rows would see it."""

    def __init__(self, seconds: float = 0.02, fail: bool = False):
        self.seconds, self.fail, self.batches = seconds, fail, []

    def embed(self, pixels, *, maps=False):
        self.batches.append(len(pixels))
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("the model failed")
        values = np.array([[float(row[0, 0, 0]), 0] for row in pixels], np.float32)
        return EmbedResult(values, [[(str(v[0]), 1.0)] for v in values], IDENTITY,
                           np.zeros((len(pixels), 2, 1, 1), np.float32) if maps else None)


def image(value: int) -> np.ndarray:
    """An image's model input pixels, as Embedder.preprocess gives them."""
    return np.full((3, 4, 4), value, np.uint8)


def concurrently(batcher: DynamicBatcher, callers: int, per_caller: int = 1):
    results, errors = {}, {}

    def call(number: int) -> None:
        try:
            values = [number * per_caller + i for i in range(per_caller)]
            results[number] = batcher.embed([image(v) for v in values], maps=number % 2 == 0)
        except Exception as e:
            errors[number] = e

    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results, errors


def test_concurrent_queries_share_forward_passes_and_each_gets_its_own_rows():
    model = SlowModel()
    batcher = DynamicBatcher(model.embed, max_images=16, wait_s=0.005)

    results, errors = concurrently(batcher, callers=40, per_caller=2)

    assert not errors and len(results) == 40
    for number, result in results.items():
        assert result.vectors[:, 0].tolist() == [2 * number, 2 * number + 1]
        assert (result.maps is not None) == (number % 2 == 0)
    assert sum(model.batches) == 80 and max(model.batches) <= 16
    assert len(model.batches) <= 20  # one pass per caller would be 40


def test_a_lone_query_runs_alone_after_the_short_wait():
    model = SlowModel(seconds=0)
    batcher = DynamicBatcher(model.embed, wait_s=0.002)

    result = batcher.embed([image(7)])

    assert result.vectors[:, 0].tolist() == [7] and model.batches == [1]


def test_a_failing_pass_fails_every_caller_in_it_and_the_next_pass_runs():
    model = SlowModel(fail=True)
    batcher = DynamicBatcher(model.embed, wait_s=0.005)

    results, errors = concurrently(batcher, callers=6)

    assert not results and len(errors) == 6
    assert all(str(e) == "the model failed" for e in errors.values())
    model.fail = False
    assert batcher.embed([image(3)]).vectors[0, 0] == 3


def test_a_caller_over_the_batch_limit_still_runs():
    model = SlowModel(seconds=0)
    batcher = DynamicBatcher(model.embed, max_images=2)

    assert batcher.embed([image(v) for v in range(5)]).vectors[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert model.batches == [5]  # one caller's images are never split


def test_callers_arriving_while_a_pass_runs_form_the_next_one_and_none_runs_twice():
    model = SlowModel(seconds=0.05)
    batcher = DynamicBatcher(model.embed, max_images=8, wait_s=0.003)
    results = {}

    def call(number: int) -> None:
        started = time.perf_counter()
        results[number] = (batcher.embed([image(number)]), time.perf_counter() - started)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.02)  # the first pass is running
    others = [threading.Thread(target=call, args=(n,)) for n in range(1, 5)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=30)

    assert model.batches == [1, 4]  # no empty pass, no caller leading a pass after its own rows were taken
    assert all(result.vectors[0, 0] == number for number, (result, _) in results.items())
    assert results[0][1] < 0.09  # the first caller did not wait for the second pass
