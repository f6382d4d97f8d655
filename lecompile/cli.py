"""The ``lecompile`` command: ``explain`` and ``dump``.

The demo is ``python -m examples.demo`` and the benchmarks ``python -m benchmarks.<name>``, both
from a source checkout (README.md).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import GRANULARITIES
from .predictors import PREDICTORS


def _explain(args) -> int:
    import torch

    from .backend import explain
    from .config import LongExposureConfig
    model = _load(args.model)
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


def _load(path: str):
    """A causal LM from a Hugging Face checkpoint folder or a GGUF file."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    model_path = Path(path)
    if model_path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name)
    return AutoModelForCausalLM.from_pretrained(model_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lecompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, seq):
        p.add_argument("--model", required=True, help="a local Hugging Face checkpoint folder or .gguf file")
        p.add_argument("--density", type=float, default=0.5, help="MLP density (default 0.5)")
        p.add_argument("--predictor", choices=sorted(PREDICTORS), default="svd")
        p.add_argument("--granularity", choices=GRANULARITIES, default="sequence")
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--seq", type=int, default=seq)

    explain = sub.add_parser("explain", help="print the rewrite report for a checkpoint")
    common(explain, 64)
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(run=_explain)

    dump = sub.add_parser("dump", help="write each graph before/after the passes and its report")
    common(dump, 64)
    dump.add_argument("--json", action="store_true")
    dump.add_argument("--out", default="lecompile-dump", help="folder (default: lecompile-dump)")
    dump.set_defaults(run=_explain)

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
