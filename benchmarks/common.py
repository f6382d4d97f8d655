"""Shared pieces of the benchmarks: model shapes and where results go."""

from __future__ import annotations

from pathlib import Path

from lecompile.results import command_line, meta  # noqa: F401  (re-exported for the benchmarks)
from lecompile.results import write_results as _write_results

RESULTS = Path(__file__).parent / "results"

#: MLP shapes of the models the issues name: (d_model, ffn, activation, gated).
MLP_SHAPES = {
    "opt-1.3b": (2048, 8192, "relu", False),
    "opt-2.7b": (2560, 10240, "relu", False),
    "gpt2-1.5b": (1600, 6400, "gelu_tanh", False),
    "llama-3-8b": (4096, 14336, "silu", True),
}


def write_results(name: str, data: dict, folder: Path = RESULTS) -> Path:
    return _write_results(name, data, folder)
