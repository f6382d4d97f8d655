"""docs/results.md and the README's results table are generated from benchmarks/results/*.json."""

from benchmarks import results_page


def test_generated_pages_are_up_to_date():
    assert results_page.main(["--check"]) == 0, "run: python -m benchmarks.results_page"


def test_readme_table_holds_only_rows_whose_baseline_ran_in_the_same_run():
    table = results_page.readme_table().splitlines()[2:]
    assert table, "no H200 rows"
    cases = results_page.e2e_latest(results_page.load("e2e"))["NVIDIA H200"]
    for line in table:
        case = line.split(" | ")[0].lstrip("| ")
        by = {r["variant"]: r for r in cases[case]}
        ours = by["lecompile-d1-cg"] if "exact (density 1.0)" in line else next(
            r for r in cases[case] if r.get("quality_setting") and f"`{r['quality_setting']}`" in line)
        assert ours["run"] == by["inductor-bf16-adapters-cg"]["run"]
        assert f"{ours['speedup_vs_strongest']:.2f}x" in line


def test_readme_table_adds_the_fastest_setting_that_passed_the_quality_harness():
    def row(variant, ms, **extra):
        return dict(run=1, case="opt-1.3b lora 8x512", variant=variant, ms=ms, speedup_vs_strongest=round(50 / ms, 3),
                    speedup=round(75 / ms, 3), **extra)

    quality = dict(heldout_delta=0.0078, schedule_speedup_vs_strongest=1.1)
    e2e = {"meta": {"runs": [{"run": 1, "device": "NVIDIA H200", "command": "python -m benchmarks.e2e"}]},
           "rows": [row("inductor-bf16-adapters-cg", 50.0), row("lecompile-d1-cg", 47.0),
                    row("lecompile-a-cg", 40.0, quality_setting="a", quality_passes=True, **quality),
                    row("lecompile-b-cg", 38.0, quality_setting="b", quality_passes=False, **quality),
                    row("lecompile-c-cg", 42.0, quality_setting="c", quality_passes=True, **quality)]}
    lines = results_page.readme_table(e2e).splitlines()[2:]
    assert lines == ["| opt-1.3b lora 8x512 | 50.0 | 47.0 | 1.06x | 1.60x | exact (density 1.0) |",
                     "| opt-1.3b lora 8x512 | 50.0 | 40.0 | 1.25x | 1.88x | "
                     "`a`: held-out +0.78%; whole schedule 1.10x |"]  # b failed, c is slower


def test_breakdown_section_shows_each_part_with_its_limit():
    from benchmarks.step_breakdown import PARTS
    parts = dict.fromkeys(PARTS, 1.0) | {"base_gemm": 30.0}
    limits = {"base_gemm": 21.5, "adapter_gemm": 0.4, "attention": None}
    run = {"run": 2, "what": "OPT", "command": "-", "date": "2026-12-05", "git_commit": "abc1234",
           "device": "NVIDIA H100 80GB HBM3"}
    data = {"meta": {"device": "NVIDIA H200", "runs": [run]},
            "rows": [{"run": 2, "case": "opt-1.3b lora 8x512", "variant": "lecompile-d1", "kernels_ms": 36.0,
                      "parts": parts, "limits": limits}]}
    lines = results_page.breakdown_section(data).splitlines()
    row = next(line for line in lines if "lecompile-d1" in line)
    assert row.startswith("| 2 | NVIDIA H100 80GB HBM3 | opt-1.3b lora 8x512 | lecompile-d1 | 36.0 | 30.00 (21.50) | "
                          "1.00 (0.40) | 1.00 | ")
    assert lines[-1] == "- run 2 (2026-12-05, abc1234): OPT"


def test_compile_section_shows_each_run_on_its_device_with_the_cold_steps_phases():
    from benchmarks.compile_time import PHASES
    phases = dict.fromkeys(PHASES, 1.0) | {"autotune": 20.0}  # measured before triton_jit was
    row = {"model": "qwen2-1.5b", "layers": None, "shape": "8x512", "variant": "lecompile-d1", "cold_s": 60.0,
           "warm_s": 12.5, "cold_next_step_s": 0.4, "cold_phases": phases, "cold_vs_inductor": 1.5}
    data = {"meta": {"device": "cpu", "runs": [{"run": 2, "device": "NVIDIA H200", "date": "2026-12-05",
                                                "git_commit": "abc1234", "what": "on the GPU"}]},
            "rows": [{"run": 2, **row}, {**row, "model": "tiny", "cold_s": 3.0, "checkpointing": True},
                     {"model": "x", "variant": "inductor", "error": "cold process failed"}]}
    data["rows"].append({**row, "model": "y", "error": "warm process failed"})
    del data["rows"][-1]["warm_s"]
    text = results_page.compile_section(data)
    assert text.endswith("- run 2 (2026-12-05, abc1234): on the GPU")
    lines = text.split("\n\nRuns:")[0].splitlines()
    assert lines[-3] == ("| 2 | NVIDIA H200 | qwen2-1.5b 8x512 | lecompile-d1 | 60.0 | 12.5 | 0.4 | 1.50x | - | "
                         + "1.0 | " * len(PHASES) + "20.0 | - |")
    assert lines[-2].startswith("| - | cpu | tiny 8x512 checkpointing | lecompile-d1 | 3.0 |")  # before any merge
    assert lines[-1].startswith("| - | cpu | y 8x512 | lecompile-d1 | 60.0 | - |")  # the warm process failed


def test_quality_line_says_where_the_passing_setting_was_timed():
    summary = [dict(setting=name, steps=300, seeds=3, kept_mlp=kept, heldout_delta=delta, heldout_delta_std=0.001,
                    exact_match=0.7, passes=delta < 0.01)
               for name, kept, delta in (("dense", 1.0, 0.0), ("default", 1.0, 0.0), ("a", 0.8, 0.008),
                                         ("b", 0.5, 0.3))]
    quality = {"meta": {"device": "NVIDIA H200"}, "summary": summary}
    assert "(300 steps, 3 seeds, NVIDIA H200)" in results_page.quality_line(quality, {"meta": {"runs": []}, "rows": []})
    quality.update(rows=[dict(setting="default", run=1), dict(setting="dense", run=2), dict(setting="a", run=3)])
    quality["meta"]["runs"] = [dict(run=1, device="NVIDIA H200"), dict(run=2, device="NVIDIA H100"),
                               dict(run=3, device="NVIDIA B200")]
    assert "(300 steps, 3 seeds, NVIDIA H100 and NVIDIA H200)" in results_page.quality_line(
        quality, {"meta": {"runs": []}, "rows": []}), "the devices of the default's and dense LoRA's rows"

    def run(number, device):
        return {"run": number, "device": device, "command": "python -m benchmarks.e2e"}

    def row(number, variant, **extra):
        return dict(run=number, case="opt-1.3b lora 8x512", variant=variant, ms=50.0, **extra)

    e2e = {"meta": {"runs": [run(1, "NVIDIA H200"), run(2, "NVIDIA H100")]}, "rows": [
        row(1, "lecompile-a-cg", quality_setting="a", speedup_vs_strongest=0.8, schedule_speedup_vs_strongest=0.5),
        row(2, "lecompile-a", quality_setting="a", speedup_vs_strongest=0.6),  # no CUDA graphs: not the one
        row(2, "lecompile-a-cg", quality_setting="a", speedup_vs_strongest=0.9, schedule_speedup_vs_strongest=0.4,
            speedup_vs_d1=0.85)]}
    line = results_page.quality_line(quality, e2e)
    assert "the sparsest setting that keeps it: `a`, +0.8% at 0.80" in line
    assert line.endswith("; timed on opt-1.3b lora 8x512 (NVIDIA H100, CUDA graphs): 0.90x the strongest dense "
                         "setup (0.85x lecompile at density 1.0) after its dense warm-up, 0.40x over its whole "
                         "schedule.")
    assert results_page.quality_line(quality, {"meta": {"runs": []}, "rows": []}).endswith(
        "; its speed not yet measured.")
    # As sparse and passing too, and faster end to end: the line names it instead.
    quality["summary"].append({**quality["summary"][2], "setting": "c", "heldout_delta": 0.009})
    e2e["rows"].append(row(2, "lecompile-c-cg", quality_setting="c", speedup_vs_strongest=1.03))
    assert "keeps it: `c`, +0.9% at 0.80" in results_page.quality_line(quality, e2e)
    assert "keeps it: `a`" in results_page.quality_line(quality, {"meta": {"runs": []}, "rows": []}), \
        "untimed, the smaller held-out loss change decides"


def test_a_quality_row_says_where_its_quality_falls_short_of_the_harness():
    row = dict(quality_setting="attn-0.5", seq=16384, heldout_delta=-0.19, quality_seq=8192, quality_seeds=1)
    assert results_page._quality(row) == "held-out -19.00% (at 8192 tokens a row, 1 seed, too few to pass)"
    row.update(seq=8192, quality_seeds=3)
    assert results_page._quality(row) == "held-out -19.00%"


def attention_row(run, seq, density, ms, **extra):
    return dict(run=run, case="llama-3-8b attention", seq=seq, batch=1, density=density, kept_density=density,
                variant="lecompile", ms=ms, baseline="dense-flash", baseline_ms=10.0, speedup=10.0 / ms,
                ideal_ratio=10.0 * density / ms, peak_mem_gib=1.0, baseline_peak_mem_gib=2.0, **extra)


def test_attention_rows_are_compared_with_the_fastest_dense_attention_of_their_run():
    rows = [attention_row(1, 8192, 0.5, 8.0, **{"pass": "fwd+bwd"}),
            attention_row(2, 8192, 0.5, 6.0, inductor_dense_ms=8.0, **{"pass": "fwd+bwd"}),  # newer: replaces run 1's
            attention_row(2, 8192, 0.5, 1.0, **{"pass": "fwd"}),
            attention_row(3, 8192, 0.5, 1.0, autotuned=True, **{"pass": "fwd+bwd"})]
    latest = results_page.attention_latest({"rows": rows})
    assert [r["run"] for r in latest] == [2]
    assert results_page.fastest_dense(latest[0]) == ("inductor", 8.0)  # Inductor's SDPA beat the baseline's 10 ms
    assert results_page.fastest_dense(rows[0]) == ("dense-flash", 10.0)


def test_attention_rows_count_for_the_kernels_that_ran():
    flash = {"settings": {"attn_kernel": "flash"}}
    assert results_page.attention_kernel({**flash, "kernels": ["flash"]}) == "flash"
    assert results_page.attention_kernel({**flash, "kernels": ["triton"]}) is None  # FA4 could not run it
    assert results_page.attention_kernel({**flash}) == "flash"  # rows from before the benchmark recorded it
    assert results_page.attention_kernel({"kernels": []}) == "triton"  # density 1.0: nothing rewritten
    assert results_page.attention_kernel({"masked": True, "kernels": ["triton"]}) is None


def test_long_context_line_pairs_the_passing_attention_density_with_its_speed():
    summary = [dict(setting="dense", options=None, seeds=3, exact_match=0.8, passes=True),
               dict(setting="attn-0.5", options={"attn_density": 0.5}, seeds=3, heldout_delta=-0.2, exact_match=0.9,
                    passes=True),
               dict(setting="attn-0.25", options={"attn_density": 0.25}, seeds=3, heldout_delta=0.5, exact_match=0.5,
                    passes=False)]
    recall = {"meta": {"seq": 4096}, "summary": summary}
    no_steps = {"meta": {"runs": []}, "rows": []}
    attention = {"meta": {"device": "GPU", "runs": [{"run": 1, "device": "H100"}]}, "rows": [
        attention_row(1, seq, density, ms, **{"pass": "fwd+bwd"})
        for seq, density, ms in ((4096, 0.5, 1.0), (8192, 0.5, 8.0), (32768, 0.5, 5.0), (8192, 0.25, 2.0))]}
    line = results_page.long_context_line(recall, attention, no_steps)
    assert line.startswith("Long context: `attn-0.5` (attention over 0.5 of the blocks) kept the quality of a recall "
                           "fine-tune at 4096 tokens: held-out answer loss -20.0% of dense LoRA's, exact match 0.90 "
                           "against 0.80 (3 seeds)")
    assert line.endswith("against 0.80 (3 seeds):\n\n- its attention alone, forward and backward, on FlexAttention's "
                         "Triton kernels: 1.25-2.00x the fastest dense attention at 8192-32768 tokens with llama-3-8b "
                         "heads (H100), 0.62-1.00 of the ideal\n- its whole training step: not yet timed")
    # FlashAttention 4's rows join the line; a newer device's rows replace the older device's range
    attention["meta"]["runs"].append({"run": 2, "device": "H200"})
    attention["rows"] += [attention_row(2, 8192, 0.5, 4.0, settings={"attn_kernel": "flash"}, **{"pass": "fwd+bwd"}),
                          attention_row(2, 32768, 0.5, 4.0, layout="band", **{"pass": "fwd+bwd"}),  # an experiment
                          attention_row(2, 32768, 0.5, 6.0, **{"pass": "fwd+bwd"})]
    line = results_page.long_context_line(recall, attention, no_steps)
    assert line.endswith("Triton kernels: 1.67x the fastest dense attention at 32768 tokens with llama-3-8b heads "
                         "(H200), 0.83 of the ideal\n- its attention alone, forward and backward, on FlashAttention "
                         "4's kernels (`attn_kernel=\"flash\"`; attention whose token mask depends on the batch stays "
                         "on the Triton kernels): 2.50x the fastest dense attention at 8192 tokens with llama-3-8b "
                         "heads (H200), 1.25 of the ideal\n- its whole training step: not yet timed")
    assert results_page.long_context_line(recall, {"meta": {}, "rows": []}, no_steps).endswith(
        "(3 seeds):\n\n- its attention's speed: not yet measured\n- its whole training step: not yet timed")
    summary[1]["passes"] = False
    assert results_page.long_context_line(recall, attention, no_steps) is None


def test_long_context_line_adds_the_newest_long_training_step_at_the_passing_density():
    summary = [dict(setting="dense", options=None, seeds=3, exact_match=0.8, passes=True),
               dict(setting="attn-0.5", options={"attn_density": 0.5}, seeds=3, heldout_delta=-0.2, exact_match=0.9,
                    passes=True)]
    recall = {"meta": {"seq": 4096}, "summary": summary}

    def row(run, case, variant, ms, seq, attn_density=1.0, mlp_density=1.0, peak=10.0):
        return dict(run=run, case=case, variant=variant, ms=ms, seq=seq, attn_density=attn_density,
                    mlp_density=mlp_density, peak_mem_gib=peak, speedup_vs_strongest=round(100 / ms, 3),
                    strongest_baseline="inductor-bf16-adapters")

    runs = [{"run": run, "device": "H100", "command": "python -m benchmarks.e2e"} for run in (1, 2)]
    e2e = {"meta": {"runs": runs}, "rows": [
        row(1, "m 1x8192", "inductor-bf16-adapters", 100.0, 8192),
        row(1, "m 1x8192", "lecompile-d1-a0.5", 50.0, 8192, attn_density=0.5, peak=4.0),
        row(2, "m 2x2048", "inductor-bf16-adapters", 100.0, 2048),  # too short
        row(2, "m 2x2048", "lecompile-d1-a0.5", 80.0, 2048, attn_density=0.5),
        row(2, "m 1x4096", "inductor-bf16-adapters", 100.0, 4096),
        row(2, "m 1x4096", "lecompile-d0.25-a0.5", 40.0, 4096, attn_density=0.5, mlp_density=0.25),  # sparse MLPs
        row(2, "m 1x4096", "lecompile-d1-a0.25", 40.0, 4096, attn_density=0.25),  # another density
        dict(row(2, "m 1x4096", "lecompile-d1-a0.5-without-p", 40.0, 4096, attn_density=0.5), without="p"),  # ablation
        row(2, "m (4 layers) 1x4096", "lecompile-d1-a0.5", 40.0, 4096, attn_density=0.5)]}  # not the whole model
    line = results_page.long_context_line(recall, {"meta": {}, "rows": []}, e2e)
    assert line.endswith("\n- a whole training step of m (H100) against `inductor-bf16-adapters` of each row's run: on "
                         "FlexAttention's Triton kernels 2.00x at 8192 tokens; at 8192 tokens 50 against 100 ms on "
                         "FlexAttention's Triton kernels, peak memory 4.0 against 10.0 GiB (quality measured up to "
                         "4096 tokens)")
    # Quality at a longer length joins the line; where it passes, the step is compared with that length.
    longer = {"meta": {"seq": 8192}, "summary": [
        dict(summary[0], exact_match=0.7), dict(summary[1], seeds=2, heldout_delta=0.3, exact_match=0.6, passes=False)]}
    line = results_page.long_context_line(recall, {"meta": {}, "rows": []}, e2e, longer=[longer])
    assert "(3 seeds); at 8192 tokens +30.0%, exact match 0.60 against 0.70 (2 seeds, not within the budget):" in line
    assert line.endswith("(quality measured up to 4096 tokens)")
    longer["summary"][1].update(seeds=3, heldout_delta=-0.1, passes=True)
    line = results_page.long_context_line(recall, {"meta": {}, "rows": []}, e2e, longer=[longer])
    assert "at 8192 tokens -10.0%, exact match 0.60 against 0.70 (3 seeds):" in line
    assert line.endswith("peak memory 4.0 against 10.0 GiB")
    # FlashAttention 4's rows get their own speeds; each length's ratio is against its own run's setup, and the
    # longest length gives the times and memory.
    e2e["meta"]["runs"].append({"run": 3, "device": "H100", "command": "python -m benchmarks.e2e"})
    e2e["rows"] += [dict(row(1, "m 1x8192", "lecompile-d1-a0.5-flash", 40.0, 8192, attn_density=0.5),
                         attn_kernel="flash"),
                    row(3, "m 1x16384", "inductor-bf16-adapters", 200.0, 16384, peak=20.0),
                    dict(row(3, "m 1x16384", "lecompile-d1-a0.5", 80.0, 16384, attn_density=0.5, peak=8.0),
                         speedup_vs_strongest=2.5)]
    assert results_page.long_context_line(recall, {"meta": {}, "rows": []}, e2e).endswith(
        "\n- a whole training step of m (H100) against `inductor-bf16-adapters` of each row's run: on FlexAttention's "
        "Triton kernels 2.00x at 8192, 2.50x at 16384 tokens; on FlashAttention 4's kernels 2.50x at 8192 tokens; at "
        "16384 tokens 80 against 200 ms on FlexAttention's Triton kernels, peak memory 8.0 against 20.0 GiB (quality "
        "measured up to 4096 tokens)")
    # A longer sequence where the strongest setup ran out of memory, lecompile at density 1.0 not.
    e2e["rows"] += [dict(run=3, case="m 1x32768", variant="inductor-bf16-adapters", seq=32768, out_of_memory=True),
                    row(3, "m 1x32768", "lecompile-d1", 90.0, 32768, peak=7.0)]
    assert results_page.long_context_line(recall, {"meta": {}, "rows": []}, e2e).endswith(
        "(quality measured up to 4096 tokens); at 32768 tokens `inductor-bf16-adapters` ran out of GPU memory, "
        "lecompile at density 1.0 took 90 ms and 7.0 GiB")


def test_sparse_attention_rows_carry_the_recall_quality_at_their_density():
    def recall(seq, *summary):
        return {"meta": {"seq": seq}, "summary": [dict(zip(("setting", "heldout_delta", "seeds", "passes"), s))
                                                  for s in summary]}

    results = [recall(4096, ("attn-0.5", -0.6, 3, True), ("attn-0.25", 0.5, 3, False)),
               recall(8192, ("attn-0.5", -0.3, 3, True))]
    row = dict(seq=32768, attn_density=0.5, mlp_density=1.0)
    assert results_page._recall_quality(row, results) == "recall -30.0% at 8192 tokens (3 seeds)"
    assert results_page._recall_quality(dict(row, seq=4096), results) == "recall -60.0% at 4096 tokens (3 seeds)"
    assert results_page._recall_quality(dict(row, seq=512), results) == "recall -60.0% at 4096 tokens (3 seeds)"
    assert results_page._recall_quality(dict(row, attn_density=0.25), results) == \
        "recall +50.0% at 4096 tokens (3 seeds, fails)"
    assert results_page._recall_quality(dict(row, attn_density=0.1), results) == "recall not measured"
    assert results_page._recall_quality(dict(row, attn_density=1.0), results) is None  # exact attention
    assert results_page._recall_quality(dict(row, mlp_density=0.5), results) is None  # its MLPs' cost is not in it


def test_a_variant_out_of_memory_keeps_its_row_on_the_page():
    run = {"run": 1, "device": "H100", "command": "python -m benchmarks.e2e"}
    rows = [dict(run=1, case="m 1x65536", variant="inductor-bf16-adapters", seq=65536, error="OutOfMemoryError()",
                 out_of_memory=True),
            dict(run=1, case="m 1x65536", variant="lecompile-d1-a0.5", seq=65536, ms=900.0, peak_mem_gib=60.0,
                 compile_s=100.0, attn_density=0.5, mlp_density=1.0)]
    section = results_page.e2e_section({"meta": {"runs": [run]}, "rows": rows})
    assert "| inductor-bf16-adapters | out of memory | - | - | - | - | - | - | - | - | - | 1 |" in section
    assert "| lecompile-d1-a0.5 | 900.0 | - | - | - | - | - | 60.00 | 100.0 | - | recall not measured | 1 |" in section
    assert "out of memory" not in str(results_page.e2e_latest({"meta": {"runs": [run]}, "rows": rows}))


def test_a_ratio_against_another_runs_baseline_names_its_run():
    runs = [{"run": run, "device": "H100", "command": "python -m benchmarks.e2e"} for run in (1, 2)]
    base = dict(case="m 1x4096", seq=4096, peak_mem_gib=1.0, strongest_baseline="inductor-bf16-adapters")
    rows = [dict(base, run=1, variant="inductor-bf16-adapters", ms=100.0, speedup_vs_strongest=1.0),
            dict(base, run=1, variant="lecompile-d1-a0.5", ms=50.0, speedup_vs_strongest=2.0),
            dict(base, run=2, variant="inductor-bf16-adapters", ms=60.0, speedup_vs_strongest=1.0),
            dict(base, run=2, variant="lecompile-d1", ms=50.0, speedup_vs_strongest=1.2)]
    section = results_page.e2e_section({"meta": {"runs": runs}, "rows": rows})
    assert "| lecompile-d1-a0.5 | 50.0 | - | - | 2.00x (run 1's baseline) |" in section
    assert "| lecompile-d1 | 50.0 | - | - | 1.20x |" in section


def test_replay_section_shows_the_gaps_by_length():
    from benchmarks.replay_gaps import GAP_BINS_US, bin_label
    gaps = {bin_label(i): [i, 0.1 * i] for i in range(len(GAP_BINS_US))}
    row = {"run": 1, "case": "llama-3.2-1b (4 layers) lora 8x512", "variant": "lecompile-d1-cg", "step_ms": 17.9,
           "back_to_back_ms": 17.5, "kernels": 427, "kernels_ms": 16.0, "busy_ms": 15.9, "head_ms": 0.2,
           "gap_ms": 1.0, "gaps": gaps}
    data = {"meta": {"device": "NVIDIA H100 80GB HBM3", "runs": [
        {"run": 1, "what": "LLaMA", "date": "2026-12-07", "git_commit": "abc1234", "device": "NVIDIA H100 80GB HBM3"}]},
        "rows": [row]}
    line = next(line for line in results_page.replay_section(data).splitlines() if "lecompile-d1-cg" in line)
    assert line == ("| 1 | NVIDIA H100 80GB HBM3 | llama-3.2-1b (4 layers) lora 8x512 | lecompile-d1-cg | 17.9 | "
                    "17.5 | 427 | 16.0 | 15.9 | 0.2 | 1.0 | 0 / 0.00 | 1 / 0.10 | 2 / 0.20 | 3 / 0.30 | 4 / 0.40 |")
