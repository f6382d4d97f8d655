"""Values derived from frozen weights (neuron-major copies, SVD factors), computed once.

An entry is reused while the weight's storage is alive and its version counter unchanged, so an
in-place update (an optimizer step on a trainable weight, ``load_state_dict``) is noticed, and a
new tensor that happens to reuse a freed address is never served a stale value.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef


class WeightCache:
    """``cache(weight, *args)`` returns ``compute(weight, *args)``, cached per weight version."""

    def __init__(self, compute: Callable[..., Any]):
        self.compute = compute
        self._entries: Dict[tuple, Tuple[StorageWeakRef, int, Any]] = {}

    def __call__(self, weight: torch.Tensor, *args) -> Any:
        hit = self._entries.get(_key(weight, args))
        if hit is None or hit[0].expired() or hit[1] != weight._version:
            return self.put(weight, args, _outside_graph_pools(self.compute, weight.detach(), *args))
        return hit[2]

    def put(self, weight: torch.Tensor, args: tuple, value: Any) -> Any:
        """Cache ``value`` as ``compute(weight, *args)`` for the weight's current version."""
        self._prune()
        self._entries[_key(weight, args)] = (StorageWeakRef(weight.untyped_storage()), weight._version, value)
        return value

    def entries_of(self, weight: torch.Tensor) -> Dict[tuple, Any]:
        """``{args: value}`` of the entries cached for the weight's current version."""
        head = _key(weight, ())
        return {key[len(head):]: value for key, (ref, version, value) in self._entries.items()
                if key[:len(head)] == head and not ref.expired() and version == weight._version}

    def clear(self) -> None:
        self._entries.clear()

    def values(self) -> list:
        """The cached values of the weights still alive."""
        return [value for ref, _, value in self._entries.values() if not ref.expired()]

    def _prune(self) -> None:
        for key in [k for k, (ref, _, _) in self._entries.items() if ref.expired()]:
            del self._entries[key]


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
            if cuda:
                with torch.cuda.device(device):
                    box["value"] = fn(*args)
                    torch.cuda.current_stream().synchronize()
            else:
                box["value"] = fn(*args)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=work, name="lecompile-helper")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
