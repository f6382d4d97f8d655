"""Inductor's caches for lecompile's graphs.

AOTAutograd's cache refuses a graph that calls Python functions it does not know, and the passes
put such functions (thin wrappers over lecompile's ops) into every graph they rewrite. They are
marked cacheable (``torch._inductor.config.unsafe_marked_cacheable_functions``), keyed on a hash of
lecompile's source: a second process that compiles the same model with the same config reuses the
AOTAutograd and FX graph caches, and any change to lecompile's code misses them.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Dict

import torch.fx as fx

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
