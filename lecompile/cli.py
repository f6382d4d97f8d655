"""The ``lecompile`` command: ``demo``, ``explain``, ``dump`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import GRANULARITIES, PREDICTORS


def _demo(args) -> int:
    from .demo import format_results, run_demo
    results = run_demo(args.model, steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                       mlp_density=args.density, predictor=args.predictor, granularity=args.granularity,
                       lora_r=args.lora_r, baseline=args.baseline, device=args.device)
    print(format_results(results))
    print("Step time is the median after the first step (which compiles). loss@1 and loss@end are "
          "each variant's own training forward (lecompile's computes only the predicted neurons, so "
          "its loss is higher); the held-out loss is measured dense on the trained model. CPU "
          "timings say nothing about GPU speed.")
    return 0


def _explain(args) -> int:
    import torch

    from .backend import explain
    from .config import LongExposureConfig
    if args.model is not None:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        from .data import load_model
        model = load_model(None)[0]
    # The rewrite depends on shapes only: random token ids of the requested batch shape do.
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    config = LongExposureConfig(mlp_density=args.density, predictor=args.predictor,
                                granularity=args.granularity, dump_dir=getattr(args, "out", None))
    model.train()
    report = explain(model, input_ids=ids, labels=ids, use_cache=False, config=config)
    if getattr(args, "out", None):
        print(f"graphs and reports written to {args.out}/ (see docs/reading-a-dump.md)")
    print(report.to_json() if args.json else report)
    return 0


def _bench(args) -> int:
    from .e2e import run
    run(args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lecompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, seq):
        p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: SmolLM2-135M)")
        p.add_argument("--density", type=float, default=0.5, help="MLP density (default 0.5)")
        p.add_argument("--predictor", choices=PREDICTORS, default="svd")
        p.add_argument("--granularity", choices=GRANULARITIES, default="sequence")
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--seq", type=int, default=seq)

    demo = sub.add_parser("demo", help="LoRA fine-tune dense vs lecompile and print a table")
    common(demo, 128)
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--lora-r", type=int, default=8)
    demo.add_argument("--baseline", choices=("eager", "inductor"), default="eager")
    demo.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    demo.set_defaults(run=_demo)

    explain = sub.add_parser("explain", help="print the rewrite report for a checkpoint")
    common(explain, 64)
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(run=_explain)

    dump = sub.add_parser("dump", help="write each graph before/after the passes and its report")
    common(dump, 64)
    dump.add_argument("--json", action="store_true")
    dump.add_argument("--out", default="lecompile-dump", help="folder (default: lecompile-dump)")
    dump.set_defaults(run=_explain)

    bench = sub.add_parser("bench", help="time whole PEFT training steps: lecompile vs eager and Inductor")
    from .e2e import add_arguments
    add_arguments(bench)
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("lecompile").setLevel(level)
    try:
        return args.run(args)
    except (RuntimeError, ValueError) as err:
        if args.verbose:
            raise
        print(f"lecompile {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
