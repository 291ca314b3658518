"""common.runtime.read_ahead: the background producer of apply's chunk pipeline must hand over
every item in order, raise the producer's error in the consumer, and stop when the consumer stops."""
import threading
import time

import pytest

from common.runtime import read_ahead


def test_read_ahead_keeps_order_and_overlaps():
    produced = []

    def slow():
        for i in range(20):
            produced.append(i)
            yield i

    out = []
    for i in read_ahead(slow(), depth=2):
        time.sleep(0.002)
        assert len(produced) >= i + 1  # produced before it was consumed
        out.append(i)
    assert out == list(range(20))


def test_read_ahead_raises_the_producer_error():
    def failing():
        yield 1
        raise OSError("truncated chunk")

    it = read_ahead(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="truncated chunk"):
        next(it)


def test_read_ahead_stops_the_producer_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = read_ahead(endless(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # a consumer leaving early (an error downstream): the thread must end
    assert threading.active_count() == before
