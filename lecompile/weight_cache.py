"""Values derived from frozen weights (neuron-major copies, SVD factors), computed once.

An entry is reused while the weight's storage is alive and its version counter unchanged, so an
in-place update (an optimizer step on a trainable weight, ``load_state_dict``) is noticed, and a
new tensor that happens to reuse a freed address is never served a stale value.

A value can be started early on a background thread (:meth:`WeightCache.prefetch`) while the
caller goes on (the passes prefetch predictor factors, then Inductor compiles);
:func:`finish_prefetches` waits for all of them and then runs the work queued for after them.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class WeightCache:
    """``cache(weight, *args)`` returns ``compute(weight, *args)``, cached per weight version."""

    def __init__(self, compute: Callable[..., Any]):
        self.compute = compute
        self._entries: Dict[tuple, Tuple[StorageWeakRef, int, Any]] = {}

    def __call__(self, weight: torch.Tensor, *args) -> Any:
        key = _key(weight, args)
        if not self._holds(key, weight):
            return self.put(weight, args, _outside_graph_pools(self.compute, weight.detach(), *args))
        return self._resolve(key)

    def prefetch(self, weight: torch.Tensor, *args) -> None:
        """Start ``compute(weight, *args)`` on lecompile's background thread unless it is cached; a
        call for it waits for it, and so does :func:`finish_prefetches`."""
        key = _key(weight, args)
        if self._holds(key, weight):
            return
        if weight.is_cuda:  # the weight's data, as the caller's stream sees it, before the other thread reads it
            torch.cuda.current_stream(weight.device).synchronize()
        future = _background().submit(_synchronized, self.compute, weight.device, weight.detach(), *args)
        _prefetching.append((self, key))
        self.put(weight, args, future)

    def put(self, weight: torch.Tensor, args: tuple, value: Any) -> Any:
        """Cache ``value`` as ``compute(weight, *args)`` for the weight's current version."""
        self._prune()
        self._entries[_key(weight, args)] = (StorageWeakRef(weight.untyped_storage()), weight._version, value)
        return value

    def entries_of(self, weight: torch.Tensor) -> Dict[tuple, Any]:
        """``{args: value}`` of the entries cached for the weight's current version."""
        head = _key(weight, ())
        return {key[len(head):]: self._resolve(key) for key, (ref, version, _) in list(self._entries.items())
                if key[:len(head)] == head and not ref.expired() and version == weight._version}

    def clear(self) -> None:
        self._entries.clear()

    def values(self) -> list:
        """The cached values of the weights still alive."""
        return [self._resolve(key) for key, (ref, _, _) in list(self._entries.items()) if not ref.expired()]

    def _holds(self, key: tuple, weight: torch.Tensor) -> bool:
        """Whether the entry ``key`` is for this weight as it is now (alive, same version)."""
        hit = self._entries.get(key)
        return hit is not None and not hit[0].expired() and hit[1] == weight._version

    def _resolve(self, key: tuple) -> Any:
        """The entry's value, once its prefetch (if it was one) is done. A failed prefetch raises
        here and leaves no entry: the next call computes anew."""
        ref, version, value = self._entries[key]
        if isinstance(value, Future):
            try:
                value = value.result()
            except BaseException:
                del self._entries[key]
                raise
            self._entries[key] = (ref, version, value)
        return value

    def _prune(self) -> None:
        for key in [k for k, (ref, _, _) in self._entries.items() if ref.expired()]:
            del self._entries[key]


_executor: Optional[ThreadPoolExecutor] = None
_prefetching: List[Tuple[WeightCache, tuple]] = []  # entries that may still hold a Future
_after_prefetches: List[Callable[[], None]] = []


def _background() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:  # one thread: prefetches run in order, never two on the GPU at once
        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lecompile-prefetch")
    return _executor


def after_prefetches(work: Callable[[], None]) -> None:
    """Run ``work()`` in :func:`finish_prefetches`, after the prefetches started before it."""
    _after_prefetches.append(work)


def finish_prefetches() -> None:
    """Wait for every prefetch started so far (errors raise here), then run the work queued with
    :func:`after_prefetches`. The backend calls it once a graph is compiled, before it ever runs:
    no prefetch is left running while a CUDA graph is captured."""
    while _prefetching:
        cache, key = _prefetching.pop(0)
        if key in cache._entries:
            cache._resolve(key)
    while _after_prefetches:
        _after_prefetches.pop(0)()


def _synchronized(fn: Callable[..., Any], device: torch.device, *args) -> Any:
    """``fn(*args)`` with ``device`` current, done on the GPU too when it returns (on a thread of
    its own, default thread-local state: it allocates from PyTorch's ordinary CUDA memory)."""
    if torch.device(device).type != "cuda":
        return fn(*args)
    with torch.cuda.device(device):
        value = fn(*args)
        torch.cuda.current_stream().synchronize()
    return value


def _key(weight: torch.Tensor, args: tuple) -> tuple:
    return (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device, *args)


def _outside_graph_pools(compute: Callable[..., Any], weight: torch.Tensor, *args) -> Any:
    """``compute(weight, *args)``, allocating from PyTorch's ordinary CUDA memory.

    Inductor's CUDA graph trees send every allocation of the calling thread to their private
    pool while a compiled graph warms up, and refuse to record when a tensor there outlives the
    graph's outputs. A cached value does, so it is computed on a helper thread, whose
    allocations go to the ordinary pool.
    """
    if weight.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return compute(weight, *args)
    return on_helper_thread(compute, weight.device, weight, *args)


def on_helper_thread(fn: Callable[..., Any], device: torch.device, *args) -> Any:
    """``fn(*args)`` on a fresh thread, waited for; on CUDA the streams of both threads are
    synchronized around it. The thread starts from default thread-local state: no CUDA-graph
    pool routing, grad mode on, no dispatch keys excluded. Errors are re-raised here."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    box = {}

    def work():
        try:
            box["value"] = _synchronized(fn, device, *args)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=work, name="lecompile-helper")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
