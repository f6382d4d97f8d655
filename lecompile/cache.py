"""Caches a second process finds: Inductor's for lecompile's graphs, and lecompile's own for
what it computes from frozen weights.

AOTAutograd's cache refuses a graph that calls Python functions it does not know, and the passes
put such functions (thin wrappers over lecompile's ops) into every graph they rewrite. They are
marked cacheable (``torch._inductor.config.unsafe_marked_cacheable_functions``), keyed on a hash of
lecompile's source: a second process that compiles the same model with the same config reuses the
AOTAutograd and FX graph caches, and any change to lecompile's code misses them. Values computed
from frozen weights at compile time (the SVD predictor's factors) go to Inductor's cache directory
by :func:`on_disk`, keyed the same way and on the weight's bytes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """SHA-256 of every Python file of the package, in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cacheable_functions(gm: fx.GraphModule) -> Dict[str, str]:
    """``{"module.name": source_hash()}`` for each lecompile function that ``gm`` calls."""
    names = {f"{node.target.__module__}.{node.target.__name__}" for node in gm.graph.nodes
             if node.op == "call_function" and getattr(node.target, "__module__", "").startswith("lecompile.")}
    return dict.fromkeys(sorted(names), source_hash())


def on_disk(compute: Callable[..., Tuple[torch.Tensor, ...]], name: str) -> Callable[..., Tuple[torch.Tensor, ...]]:
    """``compute(weight, *args)``, a tuple of tensors derived from a frozen weight, kept in
    ``<Inductor's cache directory>/lecompile/<name>`` and keyed on the weight's bytes, shape and
    dtype, ``args`` and lecompile's source, so that a second process compiling the same model
    reads it back instead of computing it again. Off where Inductor's caches are
    (``force_disable_caches``, ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``); an unreadable entry is
    computed again and rewritten, and a cache directory that cannot be made or written only costs
    the next process the computation."""
    @functools.wraps(compute)
    def cached(weight: torch.Tensor, *args):
        if _caches_off() or not _has_data(weight):
            return compute(weight, *args)
        try:
            path = _entry(name, weight, args)
            with torch._guards.tracing(None):  # inside Dynamo's compile torch.load gives meta tensors
                return tuple(torch.load(path, map_location=weight.device, weights_only=True))
        except FileNotFoundError:
            pass
        except OSError as err:  # no usable cache directory: compute, as with the caches off
            log.info("lecompile: no cache directory for %s (%s)", name, err)
            return compute(weight, *args)
        except Exception as err:  # noqa: BLE001 (a torn or foreign file: recompute and replace it)
            log.info("lecompile: ignoring the unreadable cache entry %s (%s)", path, type(err).__name__)
        values = compute(weight, *args)
        try:
            _write(path, [v.detach().cpu() for v in values])
        except OSError as err:  # a read-only or full disk costs the next process the computation, nothing more
            log.info("lecompile: cannot write the cache entry %s (%s)", path, err)
        return values
    return cached


def _has_data(weight: torch.Tensor) -> bool:
    """A plain tensor (or parameter) with its values: not a fake, meta or functional one, as
    tracing passes to the ops (those compute as they are, never from disk)."""
    return type(weight) in (torch.Tensor, torch.nn.Parameter) and weight.device.type != "meta"


def _caches_off() -> bool:
    from torch._inductor import config
    return bool(getattr(config, "force_disable_caches", False))


def _entry(name: str, weight: torch.Tensor, args: tuple) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    digest = hashlib.sha256(f"{source_hash()} {tuple(weight.shape)} {weight.dtype} {args!r}".encode())
    digest.update(weight.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return Path(cache_dir()) / "lecompile" / name / f"{digest.hexdigest()}.pt"


def _write(path: Path, values: list) -> None:
    """Write ``values`` to ``path`` whole or not at all (processes may share the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(values, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
