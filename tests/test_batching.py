"""The serving inference thread: shared batches, failures kept to their own requests."""

from __future__ import annotations

import threading

import pytest

from shitu.serving.batching import MicroBatcher


def test_batches_what_piled_up_and_fails_only_the_bad_item():
    started, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        started.set()
        release.wait(5)  # hold the first call so the rest pile up behind it
        sizes.append(len(items))
        if -1 in items:
            raise ValueError("negative item")
        return [2 * item for item in items]

    batcher = MicroBatcher({"double": double}, max_batch=8)
    try:
        first = batcher.submit("double", 1)
        assert started.wait(5)
        rest = [batcher.submit("double", item) for item in (2, -1, 3)]
        release.set()
        assert first.result(5) == 2
        assert [rest[0].result(5), rest[2].result(5)] == [4, 6]
        with pytest.raises(ValueError, match="negative item"):
            rest[1].result(5)
        assert sizes == [1, 3, 1, 1, 1]  # the three shared a call; it failed, so singly
    finally:
        batcher.close()


def test_a_failing_observer_does_not_stop_inference():
    def observe(kind: str, size: int, seconds: float) -> None:
        raise RuntimeError("metrics backend down")

    batcher = MicroBatcher({"echo": lambda items: items}, max_batch=4, observe=observe)
    try:
        assert batcher.submit("echo", "a").result(5) == "a"
        assert batcher.submit("echo", "b").result(5) == "b"  # the thread is still alive
    finally:
        batcher.close()


def test_close_finishes_queued_work_and_refuses_new_work():
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    batcher = MicroBatcher({"slow": slow}, max_batch=2)
    queued = [batcher.submit("slow", i) for i in range(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [future.result(0) for future in queued] == list(range(5))
    with pytest.raises(RuntimeError, match="has stopped"):
        batcher.submit("slow", 9)
