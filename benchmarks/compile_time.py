"""Compile time of a training step, cold and warm: lecompile against Inductor.

    python -m benchmarks.compile_time --models qwen2-1.5b --variants inductor inductor-bf16-adapters-cg \\
        lecompile-d1 lecompile-d1-cg lecompile-d0.25-cg

Each (case, variant) of :mod:`benchmarks.e2e` (its sparse-attention ``-a<density>`` and
``-mask-blocks`` variants included; ``--checkpointing``: every decoder layer checkpointed;
``--layer-breaks``: ``lecompile.compile_layers_once``, one compiled graph for every decoder layer)
compiles in two fresh processes that share a cache directory of their own
(``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``, nothing from other variants or earlier
runs): the first starts cold, the second warm, as a second run of the same
training script on the same machine would. Each process times the first training step (forward,
backward, AdamW: everything compiles there) and breaks it into disjoint phases: from
``torch._dynamo.utils.compile_times()``, Dynamo's tracing, lecompile's passes, the frozen-weight
caches the passes fill (predictor factors, neuron-major copies), AOTAutograd's joint graph and
partition, Inductor's compiles (forward and backward); measured in the process, the part Triton's
autotuner took (per kernel in ``cold_autotune``, with the config each key chose) and Triton's
just-in-time compiles of the other kernels launched from Python (the custom ops' own, per kernel
in ``cold_triton_jit``). ``cold_metrics`` keeps every ``compile_times()`` entry of a tenth of a
second or more, for what the phases do not split (Inductor's kernel compiles and benchmarks, for
one), and ``cold_inductor_counters`` Inductor's counters (kernels compiled, patterns matched).
Rows carry both processes' seconds and their second step's (the step itself, without compiling:
on the CPU a large share of the first), the warm process's cache hits, and the cold
compile over the same case's ``inductor`` and strongest (``inductor-bf16-adapters-cg``, else
``inductor-bf16-adapters``) rows when they ran.
``--stacks SECONDS``: each process dumps its Python stacks that often, and a process that runs
past ``--timeout`` leaves its last dump in the row: where a compile that never ends sits.
Writes ``compile_time.json`` and ``compile_time.png``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from benchmarks.common import (
    RESULTS,
    autotune_record,
    autotune_seconds,
    autotuning,
    command_line,
    jit_compiles,
    meta,
    write_results,
)

#: ``torch._dynamo.utils.compile_times()`` keys summed into each phase of a row.
PHASES = {
    "dynamo": ("bytecode_tracing",),
    "lecompile_passes": ("lecompile_passes",),
    # filled in the passes, or started there and waited for once Inductor is done
    "lecompile_weight_caches": ("lecompile_weight_caches", "lecompile_weight_caches_wait"),
    "aot": ("aot_trace_joint_graph", "min_cut_rematerialization_partition"),
    "inductor": ("compile_fx_inner",),
}
#: Cache counters of the warm process (``torch._dynamo.utils.counters``), by group.
CACHE_COUNTERS = {"aot_autograd": ("autograd_cache_hit", "autograd_cache_miss"),
                  "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss")}
#: Phases measured in the process itself (Triton's autotuner; other just-in-time Triton compiles).
MEASURED_PHASES = ("autotune", "triton_jit")
#: The strongest dense setups, in order of preference (:func:`add_ratios`).
STRONGEST = ("inductor-bf16-adapters-cg", "inductor-bf16-adapters")


def first_step(model: str, variant: str, shape: str, layers, device: str,
               checkpointing: bool = False, layer_breaks: bool = False, settings: Sequence[str] = ()) -> dict:
    """Build ``model`` as :mod:`benchmarks.e2e` does, run one training step through ``variant``
    (``settings``: ``FIELD=VALUE`` for a lecompile variant's config), and return its seconds,
    phases and cache counters (this process's caches as they are)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    from benchmarks import e2e
    case = e2e.Case(model, "lora", *parse_shape(shape), layers=layers, checkpointing=checkpointing,
                    layer_breaks=layer_breaks)
    step = e2e.training_step(case, lookup_variant(variant, settings), device)
    start = time.perf_counter()
    with autotuning() as tuned, jit_compiles() as compiled:
        loss = step().item()  # .item() waits for the GPU
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    step().item()
    next_seconds = time.perf_counter() - start
    phases = {name: sum(sum(compilation_time_metrics.get(key, [])) for key in keys) for name, keys in PHASES.items()}
    # the passes fill (or start) the caches: disjoint phases
    phases["lecompile_passes"] -= sum(compilation_time_metrics.get("lecompile_weight_caches", []))
    phases = {name: round(value, 2) for name, value in phases.items()}
    phases["autotune"] = autotune_seconds(tuned)
    jit = {name: dict(entry, seconds=round(entry["seconds"], 2)) for name, entry in sorted(compiled.items())
           if name not in tuned}  # an autotuned kernel's compiles are in its autotuning
    phases["triton_jit"] = round(sum(entry["seconds"] for entry in jit.values()), 2)
    metrics = {key: round(sum(values), 2) for key, values in sorted(compilation_time_metrics.items())
               if sum(values) >= 0.1}
    caches = {name: counters[group][name] for group, names in CACHE_COUNTERS.items() for name in names}
    return {"first_step_s": round(seconds, 2), "next_step_s": round(next_seconds, 2), "phases": phases,
            "caches": caches, "inductor_counters": dict(sorted(counters["inductor"].items())),
            "loss_step1": round(loss, 5), "autotune": autotune_record(tuned), "triton_jit": jit, "metrics": metrics}


def parse_shape(shape: str) -> Tuple[int, int]:
    """``"8x512"`` as ``(8, 512)``: sequences per step and tokens per sequence."""
    batch, _, seq = shape.partition("x")
    if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
        raise ValueError(f"shape {shape!r} is not BATCHxSEQ with two positive integers (e.g. 8x512)")
    return int(batch), int(seq)


def lookup_variant(name: str, settings: Sequence[str] = ()):
    """The :mod:`benchmarks.e2e` variant called ``name``: a baseline, or
    ``lecompile-d<MLP density>[-a<attention density>][-mask-blocks][-cg]`` with ``settings``
    (``FIELD=VALUE``, as ``python -m benchmarks.e2e --set`` takes them); a ``ValueError`` names
    an unknown one or a bad setting."""
    from benchmarks import e2e
    from lecompile import LongExposureConfig
    densities = re.match(r"lecompile-d([0-9.]+)(?:-a([0-9.]+))?", name)
    try:
        mlp, attention = (float(d) if d else 1.0 for d in (densities.groups() if densities else (None, None)))
    except ValueError:
        mlp = attention = 1.0  # not a number: no such variant below
    chosen = {v.name: v for v in e2e.variants(densities=[mlp], cudagraphs=name.endswith("-cg"),
                                              attn_densities=sorted({1.0, attention}),
                                              mask_blocks=name.endswith(("-mask-blocks", "-mask-blocks-cg")),
                                              settings=LongExposureConfig.parse_settings(settings))}
    if name not in chosen:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(chosen)}")
    return chosen[name]


def run_process(cmd: List[str], env: dict, timeout: float) -> Tuple[int, str, str]:
    """``cmd``'s exit code, stdout and stderr. It runs in a process group of its own, killed whole when
    it ends or runs past ``timeout`` (``subprocess.TimeoutExpired``, whose ``stderr`` is what the
    process wrote until then): Inductor's compile workers would otherwise outlive it, writing into
    the cache directory :func:`measure` is removing."""
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, cwd=Path(__file__).parent.parent) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            _kill_group(process)
            expired.output, expired.stderr = process.communicate()
            raise
        finally:
            _kill_group(process)
    return process.returncode, stdout, stderr


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_stacks(stderr: str, limit: int = 8000) -> str:
    """The last dump of a process's Python stacks (``faulthandler``, ``--stacks``) in ``stderr``,
    at most ``limit`` characters of it, or ``""``."""
    start = stderr.rfind("Timeout (")
    return stderr[start:start + limit] if start >= 0 else ""


def measure(model: str, variant: str, shape: str, layers, device: str, timeout: float,
            checkpointing: bool = False, layer_breaks: bool = False, stacks: float = 0,
            settings: Sequence[str] = ()) -> dict:
    """The cold and the warm process of one (case, variant), sharing a fresh cache directory.
    ``settings``: ``FIELD=VALUE`` for a lecompile variant's config (the row keeps them).
    ``stacks``: each process dumps its Python stacks every ``stacks`` seconds, and a row whose
    process ran past ``timeout`` keeps the last dump (``<run>_last_stacks``): where it was."""
    row = {"model": model, "layers": layers, "shape": shape, "variant": variant, "checkpointing": checkpointing,
           "layer_breaks": layer_breaks, **({"settings": list(settings)} if settings else {})}
    with tempfile.TemporaryDirectory(prefix="lecompile-compile-time-", ignore_cleanup_errors=True) as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
        for run in ("cold", "warm"):
            cmd = [sys.executable, "-m", "benchmarks.compile_time", "--one", model, variant, "--shapes", shape,
                   "--device", device] + (["--layers", str(layers)] if layers else []) + (
                       ["--checkpointing"] if checkpointing else []) + (["--layer-breaks"] if layer_breaks else []) + (
                       ["--stacks", str(stacks)] if stacks else []) + (["--set", *settings] if settings else [])
            try:
                returncode, stdout, stderr = run_process(cmd, env, timeout)
            except subprocess.TimeoutExpired as expired:
                row["error"] = f"{run} process ran past {timeout:g} s"
                stacks_at_timeout = last_stacks(expired.stderr or "")
                if stacks_at_timeout:
                    row[f"{run}_last_stacks"] = stacks_at_timeout
                return row
            if returncode != 0:
                last = (stderr.strip().splitlines() or [f"exit code {returncode}"])[-1]
                row["error"] = f"{run} process failed: {last}"
                return row
            result = json.loads(stdout.strip().splitlines()[-1])
            row[f"{run}_s"] = result["first_step_s"]
            row[f"{run}_next_step_s"] = result["next_step_s"]
            row[f"{run}_phases"] = result["phases"]
            row[f"{run}_loss_step1"] = result["loss_step1"]
            if run == "cold":
                row["cold_autotune"] = result["autotune"]
                row["cold_triton_jit"] = result["triton_jit"]
                row["cold_metrics"] = result["metrics"]
                row["cold_inductor_counters"] = result["inductor_counters"]
            else:
                row["warm_caches"] = result["caches"]
    return row


def add_ratios(rows: List[dict]) -> None:
    """``cold_vs_inductor`` and ``cold_vs_strongest`` of each row, against the same case's rows; the
    strongest is Inductor with bf16 adapters and CUDA graphs, or without CUDA graphs where the case
    has no such row (long sequences, which run without them)."""
    def case(r):
        return r["model"], r["layers"], r["shape"], r.get("checkpointing", False), r.get("layer_breaks", False)

    cold = {(case(r), r["variant"]): r["cold_s"] for r in rows if "cold_s" in r}
    for r in rows:
        strongest = next((v for v in STRONGEST if (case(r), v) in cold), None)
        for key, base in (("cold_vs_inductor", "inductor"), ("cold_vs_strongest", strongest)):
            if "cold_s" in r and (case(r), base) in cold:
                r[key] = round(r["cold_s"] / cold[(case(r), base)], 3)


def plot(rows: List[dict], path) -> None:
    """Cold and warm first-step seconds per (case, variant), the cold bar split into its phases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if "warm_s" in r]  # both processes ran
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(done) + 4), 5.5))
    labels = [f"{r['variant']}\n{r['model']}{' (' + str(r['layers']) + ' layers)' if r['layers'] else ''} {r['shape']}"
              + (" ckpt" if r.get("checkpointing") else "") + (" breaks" if r.get("layer_breaks") else "")
              + "".join(f"\n{setting}" for setting in r.get("settings", ()))
              + (f"\nrun {r['run']}" if "run" in r else "") for r in done]
    xs = range(len(done))
    bottom = [0.0] * len(done)
    for phase in (*PHASES, *MEASURED_PHASES):
        values = [r["cold_phases"].get(phase, 0.0) for r in done]
        ax.bar([x - 0.2 for x in xs], values, 0.4, bottom=bottom, label=f"cold: {phase}")
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.bar([x - 0.2 for x in xs], [r["cold_s"] - b for r, b in zip(done, bottom)], 0.4, bottom=bottom,
           label="cold: the rest (graph setup, CUDA graph capture, the step)", color="lightgrey")
    ax.bar([x + 0.2 for x in xs], [r["warm_s"] for r in done], 0.4, label="warm process", color="black")
    ax.set_xticks(list(xs), labels, fontsize=7, rotation=20, ha="right")
    ax.set(ylabel="first training step (s)", title="compile time: a cold process, then a warm one")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(models: Sequence[str], variants: Sequence[str], shapes: Sequence[str], layers, device: str,
        out: Path, timeout: float, checkpointing: bool = False, layer_breaks: bool = False, stacks: float = 0,
        settings: Sequence[str] = ()) -> dict:
    from tqdm.auto import tqdm
    rows: List[dict] = []
    data = {"meta": meta("compile_time", command_line(), settings={"method": "lora", "init": "random, seed 0"}),
            "rows": rows}
    jobs = [(m, v, s) for m in models for s in shapes for v in variants]
    for model, variant, shape in tqdm(jobs, desc="compile time", unit="variant"):
        rows.append(measure(model, variant, shape, layers, device, timeout, checkpointing, layer_breaks, stacks,
                            settings))
        add_ratios(rows)
        write_results("compile_time", data, out)  # saved as it goes, in case the run is cut short
    plot(rows, out / "compile_time.png")
    return data


def main(argv=None) -> int:
    from benchmarks import e2e
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["opt-1.3b"], choices=list(e2e.MODELS))
    parser.add_argument("--variants", nargs="+", default=["inductor", "lecompile-d1"],
                        help="benchmarks.e2e variant names (inductor, lecompile-d<MLP density>[-a<attention "
                             "density>][-mask-blocks][-cg], ...)")
    parser.add_argument("--shapes", nargs="+", default=["8x512"], help="BATCHxSEQ each (default: 8x512)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the published model")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (non-reentrant) on every decoder layer, every variant")
    parser.add_argument("--layer-breaks", action="store_true",
                        help="lecompile.compile_layers_once on every variant: each distinct layer compiles once")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each process may take")
    parser.add_argument("--stacks", type=float, default=0, metavar="SECONDS",
                        help="each process dumps its Python stacks every SECONDS (faulthandler); a row whose "
                             "process ran past --timeout keeps the last dump: what it was compiling")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="settings of every lecompile variant, e.g. lora_in_gemm=false (baselines ignore them)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for compile_time.json and .png")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    if args.stacks < 0:
        parser.error(f"--stacks must be >= 0 seconds, got {args.stacks:g}")
    if args.one:
        if args.stacks:
            faulthandler.dump_traceback_later(args.stacks, repeat=True)
        print(json.dumps(first_step(*args.one, args.shapes[0], args.layers, device, args.checkpointing,
                                    args.layer_breaks, args.set)))
        return 0
    for shape in args.shapes:  # wrong names and shapes fail here, not after the first measurements
        try:
            parse_shape(shape)
        except ValueError as err:
            parser.error(str(err))
    for variant in args.variants:
        try:
            lookup_variant(variant, args.set)
        except ValueError as err:
            parser.error(str(err))
    data = run(args.models, args.variants, args.shapes, args.layers, device, Path(args.out), args.timeout,
               args.checkpointing, args.layer_breaks, args.stacks, args.set)
    from lecompile.report import format_table
    cols = ["model", "shape", "variant", "cold_s", "warm_s", "cold_vs_inductor", "cold_vs_strongest", "error"]
    print(format_table(cols, [[r.get(c, "-") for c in cols] for r in data["rows"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
