"""What the neuron predictor costs inside a training step on the GPU (OPT-1.3B shapes).

    python -m benchmarks.predictor_cost            # svd and learned, LoRA, 8x512, MLP density 0.25

Per predictor, one process compiles the model with the backend, runs past the learned
predictor's first calibration step, then times ``--steps`` steps one by one (CUDA events); the
learned predictor calibrates (a dense step, its training after the optimizer step) once in every
``calibrate_every`` steps, so steps of that kind are timed too. A profile of three steady steps
gives the predictor op's GPU time. ``share`` = predictor ms per step (the calibration step's extra
time amortized over ``calibrate_every`` steps) / median step ms. Also the top
CPU-side ops of the profile, to show what bounds a step without CUDA graphs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from benchmarks import e2e
from benchmarks.common import RESULTS, command_line, meta, write_results
from benchmarks.step_breakdown import sort_kernels
from lecompile import LongExposureBackend, LongExposureConfig


def measure(case: e2e.Case, predictor: str, density: float, steps: int, refresh: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    config = LongExposureConfig.create(mlp_density=density, predictor=predictor, calibrate_every=refresh)
    variant = e2e.Variant(f"lecompile-d{density:g}", "lecompile", config=config)
    model = e2e.build(case, variant, "cuda")
    ids = torch.randint(0, model.config.vocab_size, (case.batch, case.seq), device="cuda")
    fn = torch.compile(model, backend=LongExposureBackend(config))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        fn(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # compile, and the learned predictor's first calibration
        step()
    times = [e2e.timed_ms(step, cuda=True) for _ in range(steps)]
    median = statistics.median(times)
    retrain = [t for t in times if t > 1.5 * median]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    parts = sort_kernels(prof, 3)
    retrain_ms = (statistics.mean(retrain) - median) if retrain else 0.0
    per_step = parts["predictor"] + (retrain_ms / refresh if predictor == "learned" and refresh else 0.0)
    top_cpu = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return dict(case=case.name, predictor=predictor, mlp_density=density, step_ms=round(median, 3),
                predictor_ms=parts["predictor"], retrain_steps=len(retrain), retrain_extra_ms=round(retrain_ms, 3),
                calibrate_every=refresh if predictor == "learned" else None,
                predictor_ms_amortized=round(per_step, 3), share=round(per_step / median, 4),
                kernels_ms=round(sum(parts.values()), 3), mlp_ms=parts["sparse_mlp"],
                top_cpu_ops=[dict(op=e.key, self_cpu_ms=round(e.self_cpu_time_total / 1e3 / 3, 3),
                                  calls_per_step=e.count // 3) for e in top_cpu])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b", choices=list(e2e.MODELS))
    parser.add_argument("--shape", default="8x512", choices=list(e2e.SHAPES))
    parser.add_argument("--predictors", nargs="+", default=["svd", "learned"], choices=("svd", "learned"))
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=110, help="timed steps (more than --refresh)")
    parser.add_argument("--refresh", type=int, default=100, help="the learned predictor's calibrate_every")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    case = e2e.Case(args.model, "lora", *e2e.SHAPES[args.shape])
    rows = []
    for predictor in args.predictors:
        rows.append(measure(case, predictor, args.density, args.steps, args.refresh))
        print({k: v for k, v in rows[-1].items() if k != "top_cpu_ops"}, flush=True)
    data = {"meta": meta("predictor_cost", command_line(), dtype="bfloat16", cudagraphs=False,
                         note="the learned predictor trains inside the step, so no CUDA graphs here"),
            "rows": rows}
    print(write_results("predictor_cost", data, args.out))


if __name__ == "__main__":
    main()
