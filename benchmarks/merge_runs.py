"""Append new runs of a benchmark to its results file, so every figure keeps its provenance.

    python -m benchmarks.merge_runs benchmarks/results/e2e.json OUT/e2e.json --what "OPT-2.7B, LoRA"

The new file's rows get the next run number (``run``) and its ``meta`` (command, date, device,
versions, commit) goes to the results file's ``meta.runs`` with ``what``. ``--commit`` replaces
the recorded commit (a copied work tree records its stale ``.git``: ``<commit>-dirty``). For
end-to-end results the per-case ratios are recomputed, since a run cut short saved its rows before
them. Ratios always compare rows of one run. Profiler breakdowns are appended with their run too.
Quality results are keyed by (setting, seed): a new run's row replaces an older one of the same
pair (the latest code's), the failures it measured are dropped, and the summary is recomputed over
all rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Optional

from benchmarks import e2e

_RUN_META = ("command", "date", "git_commit", "device", "torch", "triton")


def merge(results: dict, new: dict, what: str, commit: Optional[str] = None) -> int:
    """Add ``new``'s rows to ``results`` as the next run; returns its number."""
    if new["meta"]["benchmark"] != results["meta"]["benchmark"]:
        raise ValueError(f"cannot merge a {new['meta']['benchmark']!r} run into {results['meta']['benchmark']!r} "
                         "results")
    runs = results["meta"].setdefault("runs", [])
    run = 1 + max([r["run"] for r in runs] + [r.get("run", 0) for r in results["rows"]], default=0)
    entry = {"run": run, "what": what, **{k: new["meta"].get(k) for k in _RUN_META}}
    if commit:
        entry["git_commit"] = commit
    runs.append(entry)
    rows = [{"run": run, **r} for r in new["rows"]]
    if new["meta"]["benchmark"] == "e2e":
        for case in dict.fromkeys(r["case"] for r in rows):
            e2e.add_ratios([r for r in rows if r["case"] == case])
        e2e.add_adapter_shares(rows)
    if new["meta"]["benchmark"].startswith("quality"):
        _merge_quality(results, new, rows, run)
        return run
    results["rows"] += rows
    if new.get("breakdown"):
        results.setdefault("breakdown", []).extend({"run": run, **b} for b in new["breakdown"])
    return run


def _merge_quality(results: dict, new: dict, rows: list, run: int) -> None:
    from benchmarks.quality import summarize
    measured = {(r["setting"], r["seed"]) for r in rows}
    results["rows"] = sorted([r for r in results["rows"] if (r["setting"], r["seed"]) not in measured] + rows,
                             key=lambda r: (r["setting"], r["seed"]))
    results["failed"] = [f for f in results.get("failed", []) if (f["setting"], f["seed"]) not in measured] + [
        {"run": run, **f} for f in new.get("failed", [])]
    results["summary"] = summarize(results["rows"])


#: Benchmarks whose ``plot(rows, path)`` draws their results file, by the module that has it.
PLOTS = {"compile_time": "benchmarks.compile_time", "sparse_mlp": "benchmarks.bench_sparse_mlp",
         "sparse_attention": "benchmarks.bench_sparse_attention", "step_breakdown": "benchmarks.step_breakdown"}


def plot(results: dict, path: Path) -> None:
    """Redraw ``results``'s plot at ``path``; benchmarks without one are left alone."""
    benchmark = results["meta"]["benchmark"]
    if benchmark == "e2e":
        e2e.plot(results["rows"], path)
    elif benchmark.startswith("quality"):
        from benchmarks import quality
        quality.plot(results["summary"], results["rows"], path, quality.task_of(benchmark))
    elif benchmark in PLOTS:
        importlib.import_module(PLOTS[benchmark]).plot(results["rows"], path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the results file to extend, e.g. benchmarks/results/e2e.json")
    parser.add_argument("new", type=Path, help="the new run's results file")
    parser.add_argument("--what", required=True, help="one line: what the run measured, what cut it short")
    parser.add_argument("--commit", default=None, help="the commit the run's code was (overrides the recorded one)")
    parser.add_argument("--plot", action="store_true",
                        help="redraw the plot beside the results (e2e, quality, " + ", ".join(PLOTS) + ")")
    args = parser.parse_args(argv)
    results, new = json.loads(args.results.read_text()), json.loads(args.new.read_text())
    run = merge(results, new, args.what, args.commit)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.results.with_suffix(".png"))
    print(f"{args.new} -> {args.results}: run {run}, {len(new['rows'])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
