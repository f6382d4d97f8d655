"""Where the GPU waits inside a training step replayed as CUDA graphs.

    python -m benchmarks.replay_gaps --models llama-3.2-1b --layers 4

:mod:`benchmarks.step_breakdown` sorts kernels by the op that launched them, which a CUDA graph's
replay hides; its step runs without graphs. This one profiles the CUDA-graph variants the way
:mod:`benchmarks.e2e` times them (one step, then a wait for the GPU) and lays each step's kernels
on its timeline:

- ``step_ms``: the step as e2e times it (CUDA events around one step, median);
  ``back_to_back_ms``: the same steps run without waiting between them (wall time per step);
- ``kernels_ms``: the kernels' summed time; ``busy_ms``: the time at least one kernel ran;
- ``head_ms``: from the step's call to its first kernel (the host's work before the GPU gets any:
  Dynamo's guards, the CUDA-graph tree's checks and input copies);
- ``gap_ms``: the GPU idle between the step's first and last kernel, by gap length in ``gaps``
  (``[count, ms]`` per bin of :data:`GAP_BINS_US`), the longest in ``top_gaps`` with the kernels
  either side.

Results go to ``replay_gaps.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from benchmarks import e2e
from benchmarks.common import RESULTS, command_line, meta, write_results
from benchmarks.step_breakdown import step_wall_ms

#: Upper ends of the gap-length bins, in microseconds.
GAP_BINS_US = (2, 5, 20, 100, float("inf"))
VARIANTS = ("inductor-bf16-adapters-cg", "lecompile-d1-cg")
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_MARK = "replay_gaps.step"

#: ``(start_us, end_us, name)`` of one kernel or copy on the GPU's timeline.
Span = Tuple[float, float, str]


def bin_label(i: int) -> str:
    """The name of gap bin ``i`` of :data:`GAP_BINS_US`, such as ``"2-5 us"``."""
    low = 0 if i == 0 else GAP_BINS_US[i - 1]
    high = GAP_BINS_US[i]
    return f">={low:g} us" if high == float("inf") else f"{low:g}-{high:g} us"


def timeline(step_start_us: float, spans: Sequence[Span], top: int = 10) -> dict:
    """One step's GPU timeline: ``spans`` are its kernels, ``step_start_us`` when the host called it
    (the fields are the module docstring's, in ms)."""
    if not spans:
        raise ValueError("no GPU kernel ran in the profiled step")
    spans = sorted(spans)
    busy = 0.0
    end = spans[0][0]
    gaps = []
    previous = spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, previous, name))
        busy += max(0.0, stop - max(start, end))
        if stop >= end:
            end, previous = stop, name
    bins = [[0, 0.0] for _ in GAP_BINS_US]
    for length, _, _ in gaps:
        i = next(i for i, high in enumerate(GAP_BINS_US) if length < high)
        bins[i][0] += 1
        bins[i][1] += length / 1e3
    return dict(kernels=len(spans), kernels_ms=round(sum(s[1] - s[0] for s in spans) / 1e3, 3),
                busy_ms=round(busy / 1e3, 3), head_ms=round((spans[0][0] - step_start_us) / 1e3, 3),
                gap_ms=round(sum(g[0] for g in gaps) / 1e3, 3),
                gaps={bin_label(i): [n, round(ms, 3)] for i, (n, ms) in enumerate(bins)},
                top_gaps=[dict(us=round(length, 1), before=before[:90], after=after[:90])
                          for length, before, after in sorted(gaps, reverse=True)[:top]])


def steps_of(events) -> List[Tuple[float, List[Span]]]:
    """The profiled steps, as ``(host start, kernels)``, from the profiler's events: each step is a
    :data:`STEP_MARK` range that ended with a wait for the GPU, so its kernels ran inside it."""
    marks = sorted((e.start_ns() / 1e3, e.end_ns() / 1e3) for e in events
                   if e.name() == STEP_MARK and e.device_type().name == "CPU")
    spans = [(e.start_ns() / 1e3, e.end_ns() / 1e3, e.name()) for e in events if _on_device(e)]
    return [(start, [s for s in spans if start <= s[0] < end]) for start, end in marks]


def _on_device(event) -> bool:
    """Whether a profiler event is a kernel or copy on the GPU (not a range annotated there)."""
    if hasattr(event, "activity_type"):  # newer PyTorch
        return event.activity_type() in DEVICE_ACTIVITIES
    return event.device_type().name == "CUDA" and not event.is_user_annotation()


def profile_variant(case: e2e.Case, variant: e2e.Variant, device: str, steps: int = 3, timed: int = 20) -> dict:
    """One CUDA-graph variant's step after warm-up: its e2e time, and the median step's timeline."""
    from torch.profiler import ProfilerActivity, profile, record_function
    if torch.device(device).type != "cuda" or not variant.cudagraphs:
        raise ValueError(f"replay gaps profile a CUDA-graph variant on a CUDA device, not {variant.name!r} on "
                         f"{device!r}")
    step = e2e.training_step(case, variant, device)
    for _ in range(5):
        step()
    step_ms = statistics.median(e2e.timed_ms(step, True) for _ in range(timed))
    back_to_back = step_wall_ms(step, timed)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function(STEP_MARK):
                step()
                torch.cuda.synchronize()
    lines = sorted((timeline(start, spans) for start, spans in steps_of(prof.profiler.kineto_results.events())),
                   key=lambda t: t["busy_ms"] + t["gap_ms"])
    return dict(case=case.name, variant=variant.name, unit="ms per step", step_ms=round(step_ms, 3),
                back_to_back_ms=round(back_to_back, 3), **lines[len(lines) // 2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay_gaps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3.2-1b"], choices=list(e2e.MODELS))
    parser.add_argument("--shapes", nargs="+", default=["8x512"], choices=list(e2e.SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the published model")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant (the median is kept)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(RESULTS), help="folder for replay_gaps.json")
    args = parser.parse_args(argv)
    e2e.check_layers(args.layers)
    chosen = [v for v in e2e.variants(densities=[1.0], cudagraphs=True) if v.name in args.variants]
    rows: List[dict] = []
    data: Dict[str, object] = {"meta": meta("replay_gaps", command_line(), settings=dict(steps=args.steps)),
                               "rows": rows}
    for model in args.models:
        for shape in args.shapes:
            case = e2e.Case(model, "lora", *e2e.SHAPES[shape], layers=args.layers)
            for variant in chosen:
                rows.append(profile_variant(case, variant, args.device, args.steps))
                print({k: v for k, v in rows[-1].items() if k != "top_gaps"}, flush=True)
                write_results("replay_gaps", data, Path(args.out))
    print(f"wrote {Path(args.out) / 'replay_gaps.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
