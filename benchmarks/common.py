"""Shared pieces of the benchmarks: model shapes, where results go, and the results-file format
every benchmark writes (see ``BENCHMARKS.md``): ``{"meta", "rows"}``."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

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
def autotuning() -> Iterator[Dict[str, List[float]]]:
    """Time Triton's autotuner spends inside the block compiling and timing the configs of kernels
    not tuned before (a key found in Triton's disk cache costs nothing): yields ``{kernel name:
    [seconds, configs timed]}``, filled as the block runs. A first step's time less this is what
    Dynamo, AOTAutograd and Inductor took, plus kernels compiled without autotuning."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        yield {}
        return
    spent: Dict[str, List[float]] = {}
    bench = Autotuner._bench

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return bench(self, *args, **kwargs)
        finally:
            fn = getattr(self, "base_fn", self.fn)
            entry = spent.setdefault(getattr(fn, "__name__", repr(fn)), [0.0, 0])
            entry[0] += time.perf_counter() - start
            entry[1] += 1

    Autotuner._bench = timed
    try:
        yield spent
    finally:
        Autotuner._bench = bench


def write_results(name: str, data: dict, folder: Path = RESULTS) -> Path:
    """Write ``folder/<name>.json``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def command_line() -> str:
    """How this process was started: ``python -m benchmarks.<name> ARGS`` (or the script's path)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = f"-m {spec.name}" if spec is not None else Path(sys.argv[0]).as_posix()
    return " ".join(["python", program, *sys.argv[1:]])
