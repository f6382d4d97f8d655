"""The rewrite report: what each compiled graph matched, what it rewrote, and why not."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional


@dataclass
class MLPEntry:
    """One matched MLP block."""

    layer: str
    pattern: str                 # relu / gelu / gelu_tanh / silu_gated / ...
    peft: List[str]              # adapters found on its linears, e.g. ["fc1:lora", "fc2:ia3"]
    ffn: int
    k: int
    density: float               # k / ffn, the density actually computed
    granularity: str             # sequence / tile / batch
    rewritten: bool
    note: str = ""


@dataclass
class AttentionEntry:
    """One matched attention block."""

    layer: str
    kind: str                    # sdpa / eager
    heads: Optional[int]
    query_len: Optional[int]
    head_dim: Optional[int]
    peft: List[str]
    density: float = 1.0         # the block budget per head (attn_density)
    block: int = 0               # tokens per block
    rewritten: bool = False
    kernel: str = ""             # where rewritten: the kernels it runs on (triton / flash)
    note: str = ""


@dataclass
class LinearEntry:
    """One LoRA-wrapped linear outside a rewritten MLP."""

    layer: str
    peft: List[str]
    fused: bool                  # rewritten into lecompile::lora_linear (or lora_linears)
    note: str = ""
    shared_with: List[str] = field(default_factory=list)  # linears sharing its A-projection GEMM
    in_gemm: bool = False        # LoRA's B-projection inside the base GEMM's kernel (lora_in_gemm)


@dataclass
class LossEntry:
    """One cross-entropy loss and whether it became ``lecompile::lm_head_cross_entropy``."""

    where: str
    fused: bool
    note: str = ""


@dataclass
class NormEntry:
    """One layer norm of a training graph and whether its backward reads its output."""

    layer: str
    from_output: bool            # rewritten into layer_norm_from_output
    note: str = ""


@dataclass
class Unmatched:
    """A candidate the passes looked at and left alone."""

    where: str
    reason: str


@dataclass
class Report:
    """What the ``longexposure`` backend did to the graphs Dynamo handed it.

    ``str(report)`` is a table for people, :meth:`to_json` is for tools.
    """

    graphs: int = 0
    mlp: List[MLPEntry] = field(default_factory=list)
    attention: List[AttentionEntry] = field(default_factory=list)
    linears: List[LinearEntry] = field(default_factory=list)
    unmatched: List[Unmatched] = field(default_factory=list)
    losses: List[LossEntry] = field(default_factory=list)
    norms: List[NormEntry] = field(default_factory=list)
    checkpointed: int = 0        # regions under torch.utils.checkpoint, matched inside and still recomputed
    guard: List[str] = field(default_factory=list)  # the density guard's changes so far (min_kept_mass)
    notes: List[str] = field(default_factory=list)  # about a whole graph (one decoder layer per graph, ...)
    rank: Optional[int] = None        # this process's rank under torch.distributed, if initialized
    world_size: Optional[int] = None

    def merge(self, other: "Report") -> "Report":
        return Report(self.graphs + other.graphs, self.mlp + other.mlp, self.attention + other.attention,
                      self.linears + other.linears, self.unmatched + other.unmatched,
                      self.losses + other.losses, self.norms + other.norms,
                      self.checkpointed + other.checkpointed,
                      self.guard + [g for g in other.guard if g not in self.guard],
                      self.notes + [n for n in other.notes if n not in self.notes],
                      self.rank if self.rank is not None else other.rank,
                      self.world_size if self.world_size is not None else other.world_size)

    def compiled_plain(self, why: str) -> None:
        """Mark this graph's rewrites undone: Inductor could not compile the rewritten graph
        (``why``), so the graph as Dynamo gave it was compiled instead."""
        note = f"Inductor could not compile the rewritten graph ({why}): it runs as plain Inductor"
        for entry in (*self.mlp, *self.attention):
            if entry.rewritten:
                entry.rewritten, entry.note = False, note
        for entry in self.attention:
            entry.kernel = ""
        for linear in self.linears:
            if linear.fused:
                linear.fused, linear.in_gemm, linear.shared_with, linear.note = False, False, [], note
        for loss in self.losses:
            if loss.fused:
                loss.fused, loss.note = False, note
        for norm in self.norms:
            if norm.from_output:
                norm.from_output, norm.note = False, note
        self.checkpointed = 0
        self.notes.append(note)

    @property
    def who(self) -> str:
        """``" (rank r of n)"`` in a torch.distributed run, else ``""``."""
        return "" if self.rank is None else f" (rank {self.rank} of {self.world_size})"

    @property
    def mlp_rewritten(self) -> int:
        return sum(e.rewritten for e in self.mlp)

    @property
    def attention_rewritten(self) -> int:
        return sum(e.rewritten for e in self.attention)

    @property
    def attention_kernels(self) -> List[str]:
        """The kernels the rewritten attention runs on, sorted (none where nothing was rewritten)."""
        return sorted({e.kernel for e in self.attention if e.rewritten})

    @property
    def linears_fused(self) -> int:
        return sum(e.fused for e in self.linears)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [f"lecompile report{self.who}: {self.graphs} graph(s), {len(self.mlp)} MLP block(s) matched "
                 f"({self.mlp_rewritten} rewritten), {len(self.attention)} attention block(s) "
                 f"({self.attention_rewritten} rewritten), "
                 f"{len(self.linears)} other LoRA linear(s) ({self.linears_fused} fused), "
                 f"{len(self.unmatched)} unmatched"]
        if self.mlp:
            lines.append(format_table(
                ["layer", "pattern", "peft", "ffn", "k", "density", "granularity", "rewritten"],
                [[e.layer, e.pattern, ",".join(e.peft) or "-", e.ffn, e.k, f"{e.density:.3f}",
                  e.granularity, "yes" if e.rewritten else "no"] for e in self.mlp]))
            notes = sorted({e.note for e in self.mlp if e.note})
            lines += [f"  note: {n}" for n in notes]
        if self.attention:
            lines.append(format_table(
                ["attention", "kind", "heads", "query_len", "head_dim", "peft", "density", "block",
                 "rewritten", "kernel"],
                [[e.layer, e.kind, e.heads, e.query_len, e.head_dim, ",".join(e.peft) or "-",
                  f"{e.density:.3f}", e.block, "yes" if e.rewritten else "no", e.kernel or "-"]
                 for e in self.attention]))
            notes = sorted({e.note for e in self.attention if e.note})
            lines += [f"  note: {n}" for n in notes]
        if self.linears:
            lines.append(format_table(["LoRA linear", "peft", "fused", "A-projection shared with", "B in GEMM"], [
                [e.layer, ",".join(e.peft), "yes" if e.fused else "no",
                 ",".join(name.rsplit(".", 1)[-1] for name in e.shared_with) or "-", "yes" if e.in_gemm else "no"]
                for e in self.linears]))
            lines += [f"  note: {n}" for n in sorted({e.note for e in self.linears if e.note})]
        if self.losses:
            lines.append(format_table(["loss", "fused", "note"], [
                [e.where, "yes" if e.fused else "no", e.note or "-"] for e in self.losses]))
        if self.norms:
            kept = [e for e in self.norms if not e.from_output]
            lines.append(f"layer norms: {len(self.norms) - len(kept)} of {len(self.norms)} keep their output, not "
                         "their input, for the backward")
            if kept:
                lines.append(format_table(["layer norm", "why its input is kept"], [[e.layer, e.note] for e in kept]))
        if self.checkpointed:
            lines.append(f"gradient checkpointing: {self.checkpointed} region(s) matched inside and recomputed "
                         "in the backward as torch.utils.checkpoint would")
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"density guard: {change}" for change in self.guard]
        if self.unmatched:
            lines.append(format_table(["unmatched", "reason"], [[u.where, u.reason] for u in self.unmatched]))
        return "\n".join(lines)


def format_table(header, rows) -> str:
    """A plain-text table with aligned columns."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in cells[1:]]
    return "\n".join(out)
