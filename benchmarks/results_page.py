"""Write ``docs/results.md`` and the README's results table from ``benchmarks/results/*.json``.

    python -m benchmarks.results_page           # rewrite both
    python -m benchmarks.results_page --check   # exit 1 if either is out of date (the tests run this)

Every number on those pages comes from a results file, so none is typed twice. Ratios are the ones
each row's own run measured (its baselines ran in the same process).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks.common import RESULTS

ROOT = RESULTS.parents[1]
PAGE = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results table: begin (python -m benchmarks.results_page) -->", "<!-- results table: end -->"
#: A/B runs: rows measured with experimental settings, kept in the file but not on the page.
EXPERIMENT_FLAGS = ("--set", "--inductor-option")


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def markdown_table(header: List[str], rows: List[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}x"


def e2e_latest(e2e: dict, out_of_memory: bool = False) -> Dict[str, Dict[str, List[dict]]]:
    """Per device and case, the newest row of each variant, from runs with the default settings;
    with ``out_of_memory``, a variant that ran out of GPU memory counts as a row too."""
    runs = {r["run"]: r for r in e2e["meta"]["runs"]}
    latest: Dict[tuple, dict] = {}
    for row in e2e["rows"]:
        run = runs[row["run"]]
        if not ("ms" in row or out_of_memory and row.get("out_of_memory")) \
                or any(flag in run["command"] for flag in EXPERIMENT_FLAGS):
            continue
        key = (run.get("device") or "device not recorded", row["case"], row["variant"])
        if key not in latest or row["run"] > latest[key]["run"]:
            latest[key] = row
    out: Dict[str, Dict[str, List[dict]]] = {}
    for (device, case, _), row in sorted(latest.items(), key=lambda kv: kv[1]["run"]):
        out.setdefault(device, {}).setdefault(case, []).append(row)
    return out


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n > 1 else "")


def _quality(row: dict) -> Optional[str]:
    """A quality-setting row's held-out loss change and whole-schedule ratio to the strongest setup."""
    from benchmarks.quality import MIN_SEEDS
    if "quality_setting" not in row:
        return None
    delta = "not measured" if row.get("heldout_delta") is None else f"{100 * row['heldout_delta']:+.2f}%"
    measured = [f"at {row['quality_seq']} tokens a row"] if row.get("quality_seq") not in (None, row.get("seq")) else []
    if row.get("quality_seeds") is not None and row["quality_seeds"] < MIN_SEEDS:
        measured.append(f"{_seeds(row['quality_seeds'])}, too few to pass")
    if measured:
        delta += f" ({', '.join(measured)})"
    whole = ratio(row.get("schedule_speedup_vs_strongest"))
    return f"held-out {delta}" + (f"; whole schedule {whole}" if whole else "")


def _recall_quality(row: dict, recall: Sequence[dict]) -> Optional[str]:
    """A row with sparse attention and dense MLPs: the recall task's held-out loss change at its
    attention density (``recall``: the task's results at each length), at the longest length
    measured up to the row's, else the shortest."""
    density = row.get("attn_density", 1.0)
    if density >= 1.0 or row.get("mlp_density", 1.0) != 1.0 or "quality_setting" in row:
        return None
    found = [(r["meta"]["seq"], s) for r in recall for s in r["summary"] if s["setting"] == f"attn-{density:g}"]
    if not found:
        return "recall not measured"
    shorter = [f for f in found if f[0] <= row["seq"]]
    seq, s = max(shorter, key=lambda f: f[0]) if shorter else min(found, key=lambda f: f[0])
    fails = "" if s["passes"] else ", fails"
    return f"recall {100 * s['heldout_delta']:+.1f}% at {seq} tokens ({_seeds(s['seeds'])}{fails})"


def e2e_section(e2e: dict, recall: Sequence[dict] = ()) -> str:
    parts = ["## Whole training steps (`python -m benchmarks.e2e`)",
             "Random-init bf16 models from their Hugging Face configs, forward + backward + AdamW, median step. "
             "Variants: `eager` / `inductor` are PEFT's defaults (fp32 adapters); `inductor-bf16-adapters-cg` is the "
             "strongest dense setup (bf16 adapters, CUDA graphs); `lecompile-d<MLP density>[-a<attention "
             "density>][-cg]`. Density 1.0 is exact (loss at step 1 equal to eager's, `loss ok`); sparse rows are "
             "*set* densities whose quality cost is under Quality below, not quality-checked ones, except "
             "`lecompile-<setting>` rows: a setting of the quality harness over its whole schedule (the median step "
             "after its dense warm-up; `quality`: its held-out loss change against dense LoRA, and the mean step of "
             "the whole schedule, warm-up and predictor refreshes included, against the strongest setup); rows with "
             "sparse attention and dense MLPs: the long-context recall task's held-out loss change at that attention "
             "density, at the longest length measured up to the row's (Long-context quality below). "
             "Each ratio compares rows of one run (`run`; a table may hold several runs' rows; "
             "`benchmarks/results/e2e.json` says what each run measured). "
             "`vs d1`: against lecompile at density 1.0 (without `attn_mask_blocks`) of the same run, replayed the "
             "same way. `of limit`: the step's physical limit (its base GEMMs and attention at the GPU's bf16 GEMM "
             "rate) over the step time, where the run recorded it; `compile s`: the first step (the variants of a case "
             "compile one after another in one process and share Inductor's and Triton's caches, so a later variant "
             "may reuse kernels an earlier one built: these are not cold-compile times)."]
    order = sorted(e2e_latest(e2e, out_of_memory=True).items(), key=lambda kv: kv[0] != "NVIDIA H200")
    for device, cases in order:
        parts.append(f"### {device}")
        for case, rows in cases.items():
            runs = {r["variant"]: r["run"] for r in rows}
            table = [[r["variant"], "out of memory"] + [None] * 9 + [r["run"]] if "ms" not in r else
                     [r["variant"], f"{r['ms']:.1f}", ratio(r.get("speedup_vs_eager")), ratio(r.get("speedup")),
                      _vs_strongest(r, runs), ratio(r.get("speedup_vs_d1")), _share(r.get("limit_ratio")),
                      f"{r['peak_mem_gib']:.2f}", r.get("compile_s"),
                      {True: "yes", False: "no"}.get(r.get("loss_matches_eager")),
                      _quality(r) or _recall_quality(r, recall),
                      r["run"]]
                     for r in rows]
            parts.append(f"**{case}**\n\n" + markdown_table(
                ["variant", "step ms", "vs eager", "vs Inductor", "vs strongest", "vs d1", "of limit", "peak GiB",
                 "compile s", "loss ok", "quality", "run"], table))
    return "\n\n".join(parts)


def _vs_strongest(row: dict, runs: Dict[str, int]) -> Optional[str]:
    """``row``'s ratio to the strongest setup, naming its run where the table shows that setup's
    row of another run (``runs``: each variant's run in the table)."""
    text = ratio(row.get("speedup_vs_strongest"))
    baseline_run = runs.get(row.get("strongest_baseline"), row["run"])
    return f"{text} (run {row['run']}'s baseline)" if text and baseline_run != row["run"] else text


def _share(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}"


def breakdown_section(breakdown: dict) -> str:
    """The step breakdown: GPU ms per part of the step, with the GEMM and attention limits."""
    from benchmarks.step_breakdown import PARTS
    runs = {r["run"]: r for r in breakdown["meta"].get("runs", [])}
    device = {run: r["device"] for run, r in runs.items()}
    host = ("step_ms", "idle_ms", "launches", "syncs")
    table = [[r.get("run"), device.get(r.get("run"), breakdown["meta"]["device"]), r["case"], r["variant"],
              r["kernels_ms"]]
             + [f"{r['parts'][p]:.2f}" + (f" ({r['limits'][p]:.2f})" if r["limits"].get(p) is not None else "")
                for p in PARTS]
             + [r[k] if r.get(k) is not None else "-" for k in host] for r in breakdown["rows"]]
    return "\n\n".join([
        "## Where the step goes (`python -m benchmarks.step_breakdown`)",
        "PyTorch profiler without CUDA graphs: GPU ms per step in each part, and in brackets the part's limit (its "
        "least FLOPs at the GPU's bf16 GEMM rate; for sparse MLPs the larger of that and the weight rows their "
        "token groups read at the GPU's memory bandwidth, their FLOPs then out of `base_gemm`'s limit; rows before "
        "that limit existed show the dense one). `step ms`: the step's wall time without the profiler; `idle ms`: "
        "the part of it without a kernel on the GPU (launches, host work); `launches` and `syncs` (the host waiting "
        "for the GPU) per step; `-` in rows from before these were recorded.",
        markdown_table(["run", "device", "case", "variant", "kernels ms", *PARTS, "step ms", "idle ms", "launches",
                        "syncs"], table)]
        + (["Runs:\n\n" + _run_list(runs.values())] if runs else []))


def replay_section(replay: dict) -> str:
    """The CUDA-graph step's timeline: kernels, busy time, the host's lead-in and the idle gaps."""
    from benchmarks.replay_gaps import GAP_BINS_US, bin_label
    runs = {r["run"]: r for r in replay["meta"].get("runs", [])}
    bins = [bin_label(i) for i in range(len(GAP_BINS_US))]
    table = [[r.get("run"), runs.get(r.get("run"), replay["meta"]).get("device"), r["case"], r["variant"],
              r["step_ms"], r["back_to_back_ms"], r["kernels"], r["kernels_ms"], r["busy_ms"], r["head_ms"],
              r["gap_ms"], *(f"{r['gaps'][b][0]} / {r['gaps'][b][1]:.2f}" for b in bins)]
             for r in replay["rows"]]
    return "\n\n".join([
        "## Where a CUDA-graph step waits (`python -m benchmarks.replay_gaps`)",
        "The step as e2e times it (`step ms`: one step, then a wait for the GPU) and run back to back; its kernels' "
        "count and summed ms, the ms at least one ran (`busy`), from the step's call to its first kernel (`head`: "
        "the host's work before the GPU gets any) and the GPU's idle ms between its first and last kernel (`gaps`), "
        "split by gap length (count / ms).",
        markdown_table(["run", "device", "case", "variant", "step ms", "back to back ms", "kernels", "kernels ms",
                        "busy ms", "head ms", "gap ms", *(f"gaps {b}" for b in bins)], table)]
        + (["Runs:\n\n" + _run_list(runs.values())] if runs else []))


def compile_section(compile_time: dict) -> str:
    """First-step seconds of a cold process and a warm one, and where the cold one's went."""
    from benchmarks.compile_time import MEASURED_PHASES, PHASES
    runs = {r["run"]: r for r in compile_time["meta"].get("runs", [])}
    phases = [*PHASES, *MEASURED_PHASES]
    table = []
    for r in compile_time["rows"]:
        if "cold_s" not in r:
            continue
        device = runs.get(r.get("run"), compile_time["meta"]).get("device")
        layers = f" ({r['layers']} layers)" if r["layers"] else ""
        case = (f"{r['model']}{layers} {r['shape']}" + (" checkpointing" if r.get("checkpointing") else "")
                + (" layer-breaks" if r.get("layer_breaks") else ""))
        variant = " ".join([r["variant"], *r.get("settings", ())])
        table.append([r.get("run"), device, case, variant, r["cold_s"],
                      r.get("warm_s"), r.get("cold_next_step_s"), ratio(r.get("cold_vs_inductor")),
                      ratio(r.get("cold_vs_strongest")),
                      *(r["cold_phases"].get(p, "-") for p in phases)])
    return "\n\n".join([
        "## Compile time (`python -m benchmarks.compile_time`)",
        "The first training step (LoRA on every linear, random-init model) in a cold process, then in a warm one "
        "that finds only the first one's caches, and a later step (the step itself, without compiling); the cold "
        "step's seconds in Dynamo's tracing, lecompile's passes, the frozen-weight caches they fill (predictor "
        "factors), AOTAutograd, Inductor (forward and backward), Triton's autotuner and Triton's other compiles in "
        "the process (the custom ops' kernels; rows before it was measured show `-`). On the CPU Inductor compiles "
        "C++ and no Triton kernel runs.",
        markdown_table(["run", "device", "case", "variant", "cold s", "warm s", "later step s", "vs Inductor",
                        "vs strongest", *(f"{p} s" for p in phases)], table)]
        + (["Runs:\n\n" + _run_list(runs.values())] if runs else []))


def harness_section(quality: dict) -> str:
    """A task of the quality harness: per setting, mean and spread over seeds, through the compiled path."""
    from benchmarks.quality import MIN_SEEDS, kept, settings, task_of
    meta = quality["meta"]
    task = task_of(meta["benchmark"])
    table = [[s["setting"], _options(s["options"]), s["seeds"], s["steps"], f"{kept(s, task):.2f}",
              f"{s['heldout_loss']:.4f} ± {s['heldout_loss_std']:.4f}",
              f"{100 * s['heldout_delta']:+.2f}% ± {100 * s['heldout_delta_std']:.2f}",
              f"{s['token_accuracy']:.3f}", f"{s['exact_match']:.3f}", f"{s['step1_loss']:.3f}",
              "yes" if s["passes"] else "no"] for s in quality["summary"]]
    missing = [name for name in settings(300, task) if name not in {s["setting"] for s in quality["summary"]}]
    if task == "recall":
        title = f"## Long-context quality at {meta['seq']} tokens (`python -m benchmarks.quality --task recall`)"
        kept_is = "`kept` is the share of attention blocks each head computes"
    else:
        title = "## Quality through the compiled path (`python -m benchmarks.quality`)"
        kept_is = "`kept` is the MLP compute kept over the run"
    return "\n\n".join([
        title,
        f"{meta['model']}, LoRA {meta['lora']}, batches of {meta['batch']}x{meta['seq']} tokens, lr {meta['lr']}; "
        f"{meta['task']}. Trained through `torch.compile` (Inductor for `dense`, the backend for the rest) on the "
        f"{meta['device']}; evaluated eagerly and dense on held-out rows. Mean ± standard deviation over seeds; "
        "`vs dense` compares each seed with dense LoRA's run of the same seed (same data order and adapter "
        f"init): the mean and spread of those changes. {kept_is}. A setting "
        f"passes with at least {MIN_SEEDS} seeds and a mean change within +{100 * meta['budget']:g}%.",
        markdown_table(["setting", "config", "seeds", "steps", "kept", "held-out answer loss", "vs dense",
                        "token acc.", "exact match", "step-1 loss", "passes"], table)]
        + ([f"Not measured yet: {', '.join(missing)}."] if missing else [])
        + ["Runs (a later run's (setting, seed) replaces an earlier one's):\n\n" + _run_list(meta.get("runs", []))])


def _run_list(runs) -> str:
    """A results file's runs (``meta.runs``) as a list, a line each: number, date, commit, what."""
    return "\n".join(f"- run {r['run']} ({r['date']}, {r['git_commit']}): {r['what']}" for r in runs)


def _options(options: Optional[dict]) -> str:
    if options is None:
        return "Inductor"
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def quality_section(accuracy: dict) -> str:
    rows = accuracy["rows"]
    dense = next(r["heldout_loss"] for r in rows if r["variant"] == "dense")
    table = [[r["variant"], r["predictor"], r["granularity"], r["recipe"], f"{r['kept_density']:.2f}",
              f"{r['heldout_loss']:.4f}", f"{100 * (r['heldout_loss'] / dense - 1):+.2f}%"]
             for r in sorted(rows, key=lambda r: (-r["kept_density"], r["variant"]))]
    meta = accuracy["meta"]
    first = rows[0]
    return "\n\n".join([
        "## Quality study with masking hooks (`python -m benchmarks.accuracy`)",
        f"{first['model']}, LoRA {first['lora']}, {first['steps']} steps of {first['batch']}x{first['seq']} tokens, "
        f"{meta['text']}; {meta['task']}; seed {meta['seed']}, on the {meta['device']}. Held-out loss measured dense "
        "on the trained model; `kept` is the share of MLP compute the setting keeps. " + meta.get("note", ""),
        markdown_table(["variant", "predictor", "granularity", "recipe", "kept", "held-out loss", "vs dense"],
                       table)])


#: Block-sparse attention's kernels (``attn_kernel``), as the page names them.
ATTENTION_KERNELS = {"triton": "FlexAttention's Triton kernels", "flash": "FlashAttention 4's kernels"}


def attention_kernel(row: dict) -> Optional[str]:
    """The ``attn_kernel`` a row of the attention benchmark ran on, or ``None`` for an experiment
    (autotuned, extra FlexAttention options, another layout than the predictor's, a masked SDPA,
    other settings) or a row whose attention ran on other kernels than it asked for."""
    settings = row.get("settings") or {}
    if any(row.get(k) for k in ("autotuned", "flex_options", "layout", "masked")) or set(settings) - {"attn_kernel"}:
        return None
    asked = settings.get("attn_kernel", "triton")
    return None if row.get("kernels") and row["kernels"] != [asked] else asked


def attention_latest(attention: dict, min_seq: int = 0, kernel: str = "triton") -> List[dict]:
    """The forward+backward rows of the newest run of each (case, sequence, density) of the
    block-sparse attention benchmark on ``kernel``, at ``min_seq`` tokens or more (experiments,
    see :func:`attention_kernel`, left out)."""
    latest: Dict[tuple, dict] = {}
    for row in attention["rows"]:
        if row.get("pass") != "fwd+bwd" or attention_kernel(row) != kernel or "ms" not in row or row["seq"] < min_seq:
            continue
        key = (row["case"], row["seq"], row["density"])
        if key not in latest or row.get("run", 0) > latest[key].get("run", 0):  # a new file's rows have no run
            latest[key] = row
    return [latest[k] for k in sorted(latest)]


def fastest_dense(row: dict) -> tuple:
    """``(name, ms)`` of the faster dense attention of a row's run: the benchmark's baseline (an SDPA
    backend) or the same SDPA compiled by Inductor (``inductor_dense_ms``; on the H100 at head dim 64
    it beat FlashAttention-2 when cuDNN took no GQA)."""
    inductor = row.get("inductor_dense_ms")
    if inductor is not None and inductor < row["baseline_ms"]:
        return "inductor", inductor
    return row["baseline"], row["baseline_ms"]


def _vs_fastest_dense(row: dict) -> Tuple[float, float]:
    """A row's speedup over :func:`fastest_dense` and its share of the ideal, ``dense x kept / ms``."""
    dense = fastest_dense(row)[1]
    return dense / row["ms"], dense * row["kept_density"] / row["ms"]


def _run_device(results: dict, run: int) -> Optional[str]:
    """The device of run ``run`` of a results file (the file's own where the run has none)."""
    return next((r.get("device") for r in results["meta"].get("runs", []) if r["run"] == run), None) \
        or results["meta"].get("device")


def attention_section(attention: dict) -> str:
    table, devices = [], set()
    for kernel in ATTENTION_KERNELS:
        for r in attention_latest(attention, kernel=kernel):
            device = _run_device(attention, r["run"])
            devices.add(device)
            if r["density"] < 1.0:
                name, dense = fastest_dense(r)
                speedup, ideal = _vs_fastest_dense(r)
                gpu = (device or "-").removeprefix("NVIDIA ").split()[0]
                table.append([r["case"], kernel, r["seq"], r["batch"], r["density"], f"{r['kept_density']:.2f}", name,
                              f"{dense:.2f}", f"{r['ms']:.2f}", ratio(speedup), f"{ideal:.2f}",
                              f"{r['peak_mem_gib']:.2f} / {r['baseline_peak_mem_gib']:.2f}", gpu, r["run"]])
    return "\n\n".join([
        "## Block-sparse attention (`python benchmarks/bench_sparse_attention.py`)",
        "The backend's rewrite of a causal SDPA (pooled block predictor, block-sparse FlexAttention; bf16, blocks "
        f"of 128 tokens, 16384 tokens per call) against the fastest dense attention its run measured (SDPA on "
        f"FlashAttention or cuDNN, or the SDPA as Inductor compiles it), forward+backward GPU time, on the "
        f"{', '.join(sorted(devices))}. `kernel`: the sparse attention's (`attn_kernel`: `triton`, FlexAttention's "
        "Triton kernels, the default; `flash`, FlashAttention 4's CuTe kernels); `kept`: the share of causal blocks "
        "computed (the diagonal and the first key block always are); `of ideal`: the dense time times `kept` over "
        "the sparse time; memory: peak GiB, sparse / the SDPA baseline's. This times the attention alone; its "
        "quality is the long-context table below.",
        markdown_table(["case", "kernel", "sequence", "batch", "density", "kept", "dense", "dense ms", "sparse ms",
                        "speedup", "of ideal", "peak GiB", "GPU", "run"], table),
        "Runs:\n\n" + _run_list(attention["meta"].get("runs", []))])


def files_section() -> str:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        meta = json.loads(path.read_text())["meta"]
        plot = path.with_suffix(".png")
        rows.append([f"[{path.name}](../benchmarks/results/{path.name})",
                     f"[plot](../benchmarks/results/{plot.name})" if plot.exists() else None,
                     meta.get("device") or "-", meta.get("date") or "-"])
    return "\n\n".join(["## Every results file",
                        "Each holds its command, versions, commit and device in `meta`; "
                        "`benchmarks/results/profiles/` holds kernel profiles.",
                        markdown_table(["file", "plot", "device", "date"], rows)])


def page() -> str:
    recall = [load(path.stem) for path in sorted(RESULTS.glob("quality_recall*.json"))]
    sections = [e2e_section(load("e2e"), recall)]
    if (RESULTS / "step_breakdown.json").exists():
        sections.append(breakdown_section(load("step_breakdown")))
    if (RESULTS / "replay_gaps.json").exists():
        sections.append(replay_section(load("replay_gaps")))
    if (RESULTS / "compile_time.json").exists():
        sections.append(compile_section(load("compile_time")))
    if (RESULTS / "sparse_attention.json").exists():
        sections.append(attention_section(load("sparse_attention")))
    sections += [harness_section(load(path.stem)) for path in sorted(RESULTS.glob("quality*.json"))]
    sections += [quality_section(load("accuracy")), files_section()]
    return "\n\n".join([
        "# Results",
        "Generated by `python -m benchmarks.results_page` from `benchmarks/results/*.json`; do not edit by hand.",
        *sections]) + "\n"


def readme_table(e2e: Optional[dict] = None) -> str:
    """The README's table: lecompile's newest H200 rows at density 1.0 beside the strongest setup,
    and the fastest setting of each case that passed the quality harness, with its quality."""
    rows = []
    for case, case_rows in e2e_latest(e2e or load("e2e")).get("NVIDIA H200", {}).items():
        by = {r["variant"]: r for r in case_rows}
        ours, strongest = by.get("lecompile-d1-cg"), by.get("inductor-bf16-adapters-cg")
        if strongest is None:
            continue
        if ours is not None and ours["run"] == strongest["run"]:
            rows.append([case, f"{strongest['ms']:.1f}", f"{ours['ms']:.1f}", ratio(ours["speedup_vs_strongest"]),
                         ratio(ours.get("speedup")), "exact (density 1.0)"])
        passing = [r for r in case_rows if r.get("quality_passes") and r["run"] == strongest["run"]]
        if passing:
            best = max(passing, key=lambda r: r["speedup_vs_strongest"])
            rows.append([case, f"{strongest['ms']:.1f}", f"{best['ms']:.1f}", ratio(best["speedup_vs_strongest"]),
                         ratio(best.get("speedup")), f"`{best['quality_setting']}`: {_quality(best)}"])
    return markdown_table(["case (H200, bf16)", "strongest dense setup, ms", "lecompile, ms",
                           "vs strongest", "vs Inductor (PEFT defaults)", "quality"], rows)


def _timed_row(setting: str, e2e: dict) -> Optional[tuple]:
    """``(device, row)`` of the quality setting ``setting``'s newest end-to-end timing with CUDA graphs."""
    latest = e2e_latest(e2e)
    rows = [(device, r) for device, cases in latest.items() for case_rows in cases.values()
            for r in case_rows if r.get("quality_setting") == setting and r["variant"].endswith("-cg")
            and "speedup_vs_strongest" in r]
    return max(rows, key=lambda dr: dr[1]["run"]) if rows else None


def timed_setting(setting: str, e2e: dict) -> Optional[str]:
    """Where the quality setting ``setting`` was last timed end to end (CUDA graphs): its case, device
    and ratios to the strongest setup (and to density 1.0), after its warm-up and over its whole schedule."""
    timed = _timed_row(setting, e2e)
    if timed is None:
        return None
    device, row = timed
    whole = ratio(row.get("schedule_speedup_vs_strongest"))
    d1 = f" ({ratio(row['speedup_vs_d1'])} lecompile at density 1.0)" if row.get("speedup_vs_d1") else ""
    return (f"timed on {row['case']} ({device}, CUDA graphs): {ratio(row['speedup_vs_strongest'])} the strongest "
            f"dense setup{d1} after its dense warm-up" + (f", {whole} over its whole schedule" if whole else ""))


def quality_line(quality: dict, e2e: dict) -> str:
    """The default config's quality, and the sparsest sparse setting that passes (of equally sparse
    ones, the fastest timed end to end), else the closest, from the quality harness, with where that
    setting was timed end to end (``e2e``)."""
    by = {s["setting"]: s for s in quality["summary"]}
    default = by["default"]
    sparse = [s for s in by.values() if s["kept_mlp"] < 1.0]
    # The devices the default's and dense LoRA's rows ran on: a later run may have replaced either.
    devices = sorted({_run_device(quality, r.get("run")) for r in quality.get("rows", [])
                      if r["setting"] in ("default", "dense")} - {None}) or [quality["meta"]["device"]]
    line = (f"Quality of the default config, fine-tuning SmolLM2-135M through the backend ({default['steps']} steps, "
            f"{default['seeds']} seeds, {' and '.join(devices)}): held-out answer loss "
            f"{100 * default['heldout_delta']:+.2f}% "
            f"of dense LoRA's, seed by seed (spread ±{100 * default['heldout_delta_std']:.2f}%)")
    passing = [s for s in sparse if s["passes"]]
    if passing or sparse:
        def sparsest_then_fastest(s):
            timed = _timed_row(s["setting"], e2e)
            return round(s["kept_mlp"], 2), -timed[1]["speedup_vs_strongest"] if timed else 0.0, s["heldout_delta"]
        best = min(passing, key=sparsest_then_fastest) if passing else min(sparse, key=lambda s: s["heldout_delta"])
        lead = "the sparsest setting that keeps it" if passing else "no sparse setting keeps it yet; closest"
        seeds = _seeds(best["seeds"])
        line += (f"; {lead}: `{best['setting']}`, {100 * best['heldout_delta']:+.1f}% at {best['kept_mlp']:.2f} of "
                 f"the MLP compute, exact match {best['exact_match']:.2f} against dense LoRA's "
                 f"{by['dense']['exact_match']:.2f} ({seeds}; every setting in [docs/results.md](docs/results.md))")
        timed = timed_setting(best["setting"], e2e)
        line += f"; {timed}" if timed else "; its speed not yet measured"
    return line + "."


def long_context_line(recall: dict, attention: dict, e2e: Optional[dict] = None,
                      longer: Sequence[dict] = ()) -> Optional[str]:
    """The sparsest attention setting that passed the recall task, with its quality at the longer
    lengths of ``longer`` (recall results at more tokens), then a bullet for its attention's speed
    at 8k tokens and more on each kernel (:func:`_attention_speed`) and one for its whole training
    step (:func:`_long_context_step`); ``None`` when no attention setting passed."""
    from benchmarks.quality import kept
    by = {s["setting"]: s for s in recall["summary"]}
    passing = [s for s in by.values() if s["passes"] and kept(s, "recall") < 1.0]
    if not passing or "dense" not in by:
        return None
    best = min(passing, key=lambda s: kept(s, "recall"))
    density = kept(best, "recall")
    lines = [f"Long context: `{best['setting']}` (attention over {density:g} of the blocks) kept the quality of a "
             f"recall fine-tune at {recall['meta']['seq']} tokens: held-out answer loss "
             f"{100 * best['heldout_delta']:+.1f}% of dense LoRA's, exact match {best['exact_match']:.2f} against "
             f"{by['dense']['exact_match']:.2f} ({best['seeds']} seeds)"]
    quality_seq = recall["meta"]["seq"]
    for long in sorted(longer, key=lambda r: r["meta"]["seq"]):
        long_by = {s["setting"]: s for s in long["summary"]}
        at, dense = long_by.get(best["setting"]), long_by.get("dense")
        if at and dense:
            lines[0] += (f"; at {long['meta']['seq']} tokens {100 * at['heldout_delta']:+.1f}%, exact match "
                         f"{at['exact_match']:.2f} against {dense['exact_match']:.2f} ({_seeds(at['seeds'])}"
                         + ("" if at["passes"] else ", not within the budget") + ")")
            quality_seq = long["meta"]["seq"] if at["passes"] else quality_seq
    for kernel, name in ATTENTION_KERNELS.items():
        speed = _attention_speed(attention, density, kernel)
        if speed:
            setting = (f' (`attn_kernel="{kernel}"`; attention whose token mask depends on the batch stays on the '
                       'Triton kernels)') if kernel != "triton" else ""
            lines.append(f"- its attention alone, forward and backward, on {name}{setting}: {speed}")
    if len(lines) == 1:
        lines.append("- its attention's speed: not yet measured")
    step = _long_context_step(load("e2e") if e2e is None else e2e, density, quality_seq)
    lines.append(f"- {step}" if step else "- its whole training step: not yet timed")
    return f"{lines[0]}:\n\n" + "\n".join(lines[1:])


def _long_context_step(e2e: dict, density: float, quality_seq: int) -> Optional[str]:
    """The whole training step at 4096 tokens or more with attention density ``density`` (MLPs
    dense; whole models, not a pass's ablation), on the device and case (less its shape) timed
    last: per attention kernel, the speedup over the strongest setup of each row's own run at
    every length timed; at the longest length, time and peak memory against that setup's; the
    longest length the density's quality was measured at, where rows are longer; and a longer
    sequence of the case at which the strongest setup ran out of GPU memory."""
    latest = e2e_latest(e2e)
    rows = [(device, r) for device, cases in latest.items() for case_rows in cases.values()
            for r in case_rows if r["seq"] >= 4096 and r.get("attn_density") == density
            and r.get("mlp_density", 1.0) == 1.0 and r.get("speedup_vs_strongest") is not None
            and not _truncated(r["case"]) and not r.get("without")]
    if not rows:
        return None
    device, newest = max(rows, key=lambda dr: dr[1]["run"])
    family = _without_shape(newest["case"])
    by_kernel = {kernel: sorted((r for d, r in rows if d == device and _without_shape(r["case"]) == family
                                 and r.get("attn_kernel", "triton") == kernel), key=lambda r: r["seq"])
                 for kernel in ATTENTION_KERNELS}
    speeds = [f"on {ATTENTION_KERNELS[kernel]} " + ", ".join(f"{ratio(r['speedup_vs_strongest'])} at {r['seq']}"
                                                          for r in kernel_rows) + " tokens"
              for kernel, kernel_rows in by_kernel.items() if kernel_rows]
    longest = max((r for kernel_rows in by_kernel.values() for r in kernel_rows), key=lambda r: r["seq"])
    base = next(r for r in e2e["rows"] if r["run"] == longest["run"] and r["case"] == longest["case"]
                and r["variant"] == longest["strongest_baseline"])
    return (f"a whole training step of {family} ({device}) against `{base['variant']}` of each row's run: "
            + "; ".join(speeds)
            + f"; at {longest['seq']} tokens {longest['ms']:.0f} against {base['ms']:.0f} ms on "
            f"{ATTENTION_KERNELS[longest.get('attn_kernel', 'triton')]}, peak memory {longest['peak_mem_gib']:.1f} "
            f"against {base['peak_mem_gib']:.1f} GiB"
            + (f" (quality measured up to {quality_seq} tokens)" if longest["seq"] > quality_seq else "")
            + _out_of_memory_beyond(e2e, device, longest))


def _out_of_memory_beyond(e2e: dict, device: str, row: dict) -> str:
    """Where the strongest setup ran out of GPU memory on ``row``'s case at a longer sequence and
    lecompile at density 1.0 ran: that sequence, lecompile's step time and peak memory."""
    for case, rows in sorted(e2e_latest(e2e, out_of_memory=True).get(device, {}).items(),
                             key=lambda kv: kv[1][0]["seq"]):
        by = {r["variant"]: r for r in rows}
        base, exact = by.get(row["strongest_baseline"], {}), by.get("lecompile-d1", {})
        if (rows[0]["seq"] > row["seq"] and _without_shape(case) == _without_shape(row["case"])
                and base.get("out_of_memory") and "ms" in exact):
            return (f"; at {rows[0]['seq']} tokens `{row['strongest_baseline']}` ran out of GPU memory, lecompile at "
                    f"density 1.0 took {exact['ms']:.0f} ms and {exact['peak_mem_gib']:.1f} GiB")
    return ""


def _truncated(case: str) -> bool:
    """Whether a case runs fewer decoder layers than its model has (``(4 layers)`` in its name)."""
    return re.search(r"\(\d+ layers\)", case) is not None


def _without_shape(case: str) -> str:
    """A case's name without its ``<batch>x<seq>`` word."""
    return " ".join(word for word in case.split() if not re.fullmatch(r"\d+x\d+", word))


def _attention_speed(attention: dict, density: float, kernel: str) -> Optional[str]:
    """The speed range of ``kernel`` at ``density`` and 8k tokens or more, from the newest device's
    rows of the case with the largest heads (the llama-3-8b shape where it ran)."""
    rows = [r for r in attention_latest(attention, min_seq=8192, kernel=kernel) if r["density"] == density]
    cases = sorted({r["case"] for r in rows}, key=lambda c: ("8b" not in c, c))
    rows = [r for r in rows if r["case"] == cases[0]] if cases else []
    if not rows:
        return None
    device = _run_device(attention, max(rows, key=lambda r: r["run"])["run"])
    rows = [r for r in rows if _run_device(attention, r["run"]) == device]  # ratios of one kind of GPU
    speed, ideal = zip(*map(_vs_fastest_dense, rows))
    return (f"{_span(speed, '.2f')}x the fastest dense attention at {_span([r['seq'] for r in rows], 'd')} tokens "
            f"with {cases[0].split()[0]} heads ({device}), {_span(ideal, '.2f')} of the ideal")


def _span(values, spec: str) -> str:
    """``low-high`` of ``values`` in format ``spec``, one number where they agree."""
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def readme() -> str:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    lines = [readme_table(), quality_line(load("quality"), load("e2e"))]
    if (RESULTS / "quality_recall.json").exists() and (RESULTS / "sparse_attention.json").exists():
        longer = [load(path.stem) for path in sorted(RESULTS.glob("quality_recall_*.json"))]
        lines.append(long_context_line(load("quality_recall"), load("sparse_attention"), longer=longer))
    return f"{head}{BEGIN}\n" + "\n\n".join(line for line in lines if line) + f"\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results_page", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date, write nothing")
    args = parser.parse_args(argv)
    stale = [path for path, text in ((PAGE, page()), (README, readme()))
             if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m benchmarks.results_page", file=sys.stderr)
        return 1 if stale else 0
    PAGE.write_text(page())
    README.write_text(readme())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
