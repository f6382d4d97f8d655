"""A dense MLP's activation backward inside its down projection's backward GEMM.

After ``fuse_lora``, a dense MLP reads ``down(act(gate) * up)`` (``fc2(act(fc1))`` ungated) with
the down projection a ``lecompile::lora_linear`` whose B-projection runs in the base GEMM's
kernel. Its backward writes ``dh [tokens, ffn]``, and Inductor's activation backward reads it back
with ``gate`` and ``up`` to write their gradients. This pass makes the down projection a
``lecompile::activated_lora_linear`` reading ``gate`` and ``up`` itself, whose backward GEMM
ends in the activation's backward: ``dh`` is neither written nor read again. The forward is
unchanged (Inductor computes the activation in one kernel, as before).

It applies where the kernel runs (``lora_in_gemm`` on a Hopper GPU, :func:`~.fuse_lora.takes_kernel`),
to MLPs the sparse rewrite left dense, when the ``activation_in_gemm`` tuning knob is on (off by
default: on an H100 the whole step did not measurably gain); the report says how many.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops.activated_lora_linear import activated_lora_linear
from ..ops.lora_linear import lora_linear
from .fuse_lora import takes_kernel
from .graph import meta_value, recompile, replace_uses
from .match_mlp import MLPMatch

NOTE = ("activation_in_gemm: {n} MLP(s) compute their activation's backward in the down projection's backward "
        "GEMM")


def activation_in_gemm(ctx) -> None:
    """Rewrite each qualifying dense MLP's down projection (see the module docstring)."""
    tuning = ctx.config.tuning
    if not ctx.training or not (tuning.lora_in_gemm and tuning.activation_in_gemm):
        return
    rewritten = 0
    for mlp in ctx.mlps:
        down = _down_projection(mlp, ctx)
        if down is None:
            continue
        pre = ctx.lora_outputs.get(mlp.fc1.out, mlp.fc1.out)
        up = None if mlp.up is None else ctx.lora_outputs.get(mlp.up.out, mlp.up.out)
        _, weight, bias, _, lora_a, lora_b, scale, _ = down.args
        with ctx.gm.graph.inserting_before(down):
            y = ctx.gm.graph.call_function(activated_lora_linear, (pre, up, mlp.activation, weight, bias, lora_a,
                                                                   lora_b, scale, True))
        replace_uses(down, y)
        rewritten += 1
        counters["lecompile"]["activation_in_gemm"] += 1
    if rewritten:
        recompile(ctx.gm)
        ctx.report.notes.append(NOTE.format(n=rewritten))


def _down_projection(mlp: MLPMatch, ctx) -> Optional[fx.Node]:
    """The ``lora_linear`` call ``fuse_lora`` made of ``mlp``'s down projection, where the pass
    applies to it: a dense MLP, its down projection the only reader of the activation, on the
    kernel, without LoRA dropout, and the activation's inputs and output of one dtype."""
    if any(lin.consumed for lin in (mlp.fc1, mlp.up, mlp.fc2) if lin is not None):
        return None
    down = ctx.lora_outputs.get(mlp.fc2.out)
    h = mlp.fc2.x
    if down is None or down.target is not lora_linear or down.args[0] is not h or set(h.users) != {down}:
        return None
    if down.args[3] is not None or not down.args[7] or not takes_kernel(mlp.fc2, ctx):
        return None
    values = [meta_value(n) for n in (h, mlp.fc1.out, mlp.up.out if mlp.up is not None else h)]
    if any(v is None or v.dtype != values[0].dtype or v.shape != values[0].shape for v in values):
        return None
    return down
