"""Values cached per frozen weight (``lecompile/weight_cache.py``), and their prefetch."""

import threading

import pytest
import torch

from lecompile import weight_cache
from lecompile.weight_cache import WeightCache, after_prefetches, finish_prefetches


class _Recorder:
    """A computation that records the thread it ran on; ``release`` holds it until set."""

    def __init__(self):
        self.threads, self.release = [], threading.Event()
        self.release.set()

    def __call__(self, weight, scale):
        assert self.release.wait(10)
        self.threads.append(threading.current_thread().name)
        return weight * scale


def test_a_prefetch_runs_on_the_background_thread_and_a_call_waits_for_it():
    compute, w = _Recorder(), torch.ones(3)
    cache = WeightCache(compute)
    compute.release.clear()
    cache.prefetch(w, 2.0)
    assert compute.threads == []  # still held: the caller went on
    compute.release.set()
    assert torch.equal(cache(w, 2.0), torch.full((3,), 2.0))
    assert cache(w, 2.0) is cache(w, 2.0)
    assert len(compute.threads) == 1 and compute.threads[0].startswith("lecompile-prefetch")
    finish_prefetches()


def test_finish_waits_for_every_prefetch_then_runs_the_work_queued_after_them():
    compute, order = _Recorder(), []
    cache = WeightCache(compute)
    weights = [torch.ones(2), torch.zeros(2)]
    for w in weights:
        cache.prefetch(w, 3.0)
        after_prefetches(lambda w=w: order.append(cache.entries_of(w)))
    finish_prefetches()
    assert weight_cache._prefetching == [] and weight_cache._after_prefetches == []
    assert [torch.equal(entries[(3.0,)], w * 3.0) for entries, w in zip(order, weights)] == [True, True]
    assert all(not isinstance(v, weight_cache.Future) for v in cache.values())


def test_a_cached_value_is_not_prefetched_again_but_a_changed_weight_is():
    compute, w = _Recorder(), torch.ones(2)
    cache = WeightCache(compute)
    first = cache(w, 1.0)
    cache.prefetch(w, 1.0)
    finish_prefetches()
    assert cache(w, 1.0) is first and len(compute.threads) == 1
    w.add_(1.0)  # a new version: what was cached is stale
    cache.prefetch(w, 1.0)
    assert torch.equal(cache(w, 1.0), torch.full((2,), 2.0)) and len(compute.threads) == 2
    finish_prefetches()


def test_a_failed_prefetch_raises_where_it_is_waited_for_and_the_next_call_computes_anew():
    calls = []

    def fails_once(weight):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("no factors for this weight")
        return weight + 1

    cache, w = WeightCache(fails_once), torch.ones(2)
    cache.prefetch(w)
    with pytest.raises(RuntimeError, match="no factors for this weight"):
        finish_prefetches()
    finish_prefetches()  # nothing left
    assert torch.equal(cache(w), torch.full((2,), 2.0)) and len(calls) == 2
