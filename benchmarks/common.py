"""Shared pieces of the benchmarks: model shapes, where results go, and the results-file format
every benchmark writes (see ``BENCHMARKS.md``): ``{"meta", "rows"}``."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator

import torch

RESULTS = Path(__file__).parent / "results"

#: MLP shapes of the models the issues name: (d_model, ffn, activation, gated).
MLP_SHAPES = {
    "opt-1.3b": (2048, 8192, "relu", False),
    "opt-2.7b": (2560, 10240, "relu", False),
    "gpt2-1.5b": (1600, 6400, "gelu_tanh", False),
    "llama-3-8b": (4096, 14336, "silu", True),
}


def meta(benchmark: str, command: str, **extra) -> dict:
    """Device, versions, commit, date and the command that made the results."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        # "-dirty": the code differs from that commit (uncommitted changes, or a copied work tree)
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"benchmark": benchmark,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton_version, "git_commit": commit,
            "date": datetime.date.today().isoformat(), "command": command, **extra}


@contextlib.contextmanager
def autotuning() -> Iterator[Dict[str, dict]]:
    """What Triton's autotuner does inside the block for kernels not tuned before (a key found in
    Triton's disk cache costs nothing): yields ``{kernel name: {"seconds", "configs", "best"}}``,
    filled as the block runs: the seconds spent compiling and timing configs, how many were
    timed, and the config each tuned key chose (what a shorter config list must keep). A first
    step's time less the seconds is what Dynamo, AOTAutograd and Inductor took, plus kernels
    compiled without autotuning."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        yield {}
        return
    spent: Dict[str, dict] = {}
    tuners: Dict[str, tuple] = {}  # name -> (autotuner, the keys it had tuned before the block)
    bench = Autotuner._bench

    def name_of(tuner):
        fn = getattr(tuner, "base_fn", tuner.fn)
        name = getattr(fn, "__name__", repr(fn))
        tuners.setdefault(name, (tuner, set(getattr(tuner, "cache", {}))))  # the key being tuned is not in it yet
        return name

    Autotuner._bench = _timed(bench, spent, name_of, "configs", best={})
    try:
        yield spent
    finally:
        Autotuner._bench = bench
        for name, (tuner, before) in tuners.items():
            spent[name]["best"] = {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()
                                   if key not in before}


@contextlib.contextmanager
def jit_compiles() -> Iterator[Dict[str, dict]]:
    """Triton's just-in-time compiles in this process inside the block, disk-cache hits included:
    yields ``{kernel name: {"seconds", "compiles"}}``, filled as the block runs. These are the
    kernels launched from Python (custom ops' own kernels, and every config the autotuner times);
    Inductor compiles its kernels in worker processes, which this does not see."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield {}
        return
    spent: Dict[str, dict] = {}
    compile_ = JITFunction._do_compile
    JITFunction._do_compile = _timed(compile_, spent, lambda kernel: getattr(kernel, "__name__", repr(kernel)),
                                     "compiles")
    try:
        yield spent
    finally:
        JITFunction._do_compile = compile_


def _timed(method: Callable, spent: Dict[str, dict], name_of: Callable, count: str, **extra) -> Callable:
    """``method`` (of a Triton class), adding each call's seconds and one to ``count`` in
    ``spent[name_of(self)]``, an entry that starts with ``extra``."""
    def timed(self, *args, **kwargs):
        name = name_of(self)
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            entry = spent.setdefault(name, {"seconds": 0.0, count: 0, **copy.deepcopy(extra)})
            entry["seconds"] += time.perf_counter() - start
            entry[count] += 1

    return timed


def autotune_seconds(tuned: Dict[str, dict]) -> float:
    """All seconds of an :func:`autotuning` record."""
    return round(sum(entry["seconds"] for entry in tuned.values()), 1)


def autotune_record(tuned: Dict[str, dict]) -> Dict[str, dict]:
    """An :func:`autotuning` record as results files keep it: kernels by name, seconds rounded."""
    return {name: dict(entry, seconds=round(entry["seconds"], 1)) for name, entry in sorted(tuned.items())}


def write_results(name: str, data: dict, folder: Path = RESULTS) -> Path:
    """Write ``folder/<name>.json``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_sets_as_lists) + "\n")
    return path


def _sets_as_lists(value):
    """JSON for the sets in settings (``--set disable=fuse_loss`` is a frozenset): a sorted list."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def command_line() -> str:
    """How this process was started: ``python -m benchmarks.<name> ARGS`` (or the script's path)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"-m {spec.name}" if spec is not None else Path(sys.argv[0]).as_posix()
    return " ".join(["python", program, *sys.argv[1:]])
