"""What one compiled LoRA training step keeps alive for its backward, grouped by shape and dtype.

    python -m benchmarks.profiles.saved_tensors --model opt-2.7b --layers 2 --density 0.25 \\
        --attn-density 0.5

Builds the e2e harness's model (random init, bf16 on CUDA), compiles it with the ``longexposure``
backend (no CUDA graphs), runs one step to compile, then records every tensor the forward saves
(``torch.autograd.graph.saved_tensors_hooks``, one entry per storage: views of one buffer count
once; parameters are listed too).
"""

import argparse
import collections

import torch

from benchmarks import e2e
from lecompile.backend import LongExposureBackend
from lecompile.config import LongExposureConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-2.7b", choices=list(e2e.MODELS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shape", default="8x512")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--attn-density", type=float, default=0.5)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="further config fields (bools)")
    args = parser.parse_args()
    batch, seq = map(int, args.shape.split("x"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = {k: v.lower() == "true" for k, v in (item.split("=", 1) for item in args.set)}
    cfg = LongExposureConfig(mlp_density=args.density, attn_density=args.attn_density, **fields)
    case = e2e.Case(args.model, "lora", batch, seq, layers=args.layers)
    model = e2e.build(case, e2e.Variant("probe", "lecompile", config=cfg), device)
    fn = torch.compile(model, backend=LongExposureBackend(cfg))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    fn(input_ids=ids, labels=ids).loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    views = collections.defaultdict(set)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        seen.setdefault(ptr, (tuple(t.shape), str(t.dtype).replace("torch.", ""), t.untyped_storage().nbytes(),
                              ptr in params))
        views[ptr].add((tuple(t.shape), t.stride()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(input_ids=ids, labels=ids).loss
    groups = collections.defaultdict(lambda: [0, 0])
    for shape, dtype, nbytes, is_param in seen.values():
        g = groups[(shape, dtype, is_param)]
        g[0] += 1
        g[1] += nbytes
    hidden = batch * seq * model.config.hidden_size * 2
    saved = sum(g[1] for k, g in groups.items() if not k[2])
    print(f"{case.name}, mlp {args.density}, attention {args.attn_density}, {fields or 'defaults'}: "
          f"{saved / 2**20:.1f} MiB of activations saved, {saved / hidden:.2f} bf16 [tokens, hidden] tensors, "
          f"{saved / hidden / args.layers:.2f} per layer")
    for (shape, dtype, is_param), (n, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        if not is_param:
            print(f"{n:4d} x {str(shape):24s} {dtype:9s} {nbytes / 2**20:9.1f} MiB")
    print("storages of at least one [tokens, hidden] tensor, with every view saved of them:")
    for ptr, (shape, dtype, nbytes, is_param) in seen.items():
        if not is_param and nbytes >= hidden:
            print(f"  {nbytes / 2**20:7.1f} MiB  " + "; ".join(f"{s} stride {st}" for s, st in sorted(views[ptr])))
    del loss


if __name__ == "__main__":
    main()
