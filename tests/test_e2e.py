"""The end-to-end benchmark harness (``python -m benchmarks.e2e``) on a tiny model on the CPU."""

import json

import pytest
import torch

from benchmarks import e2e

pytestmark = pytest.mark.slow  # whole models compiled many times: the second test command


def test_run_case_records_ratios_and_checks_loss(tmp_path):
    case = e2e.Case("tiny-llama", "lora", 2, 32)
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "lecompile-d1")]
    rows = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    assert [r["variant"] for r in rows] == ["eager", "lecompile-d1"]
    eager, lec = rows
    assert "error" not in lec, lec.get("error")
    assert lec["loss_matches_eager"] is True, (lec["loss_step1"], eager["loss_step1"])
    assert lec["speedup_vs_eager"] == pytest.approx(eager["ms"] / lec["ms"], rel=1e-2)
    assert lec["lora_linears_fused"] > 0 and lec["mlp_matched"] == 2
    assert lec["autotune_s"] == 0.0 and lec["autotune"] == {}  # the CPU runs no Triton kernel
    e2e.plot(rows, tmp_path / "e2e.png")
    assert (tmp_path / "e2e.png").stat().st_size > 0
    json.dumps(rows)  # the results file takes them as they are


def test_moe_case_compiles_whole_with_the_experts_adapters_fused():
    case = e2e.Case("tiny-mixtral", "lora", 2, 32)
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "lecompile-d1")]
    eager, lec = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    assert "error" not in lec, lec.get("error")
    assert lec["loss_matches_eager"] is True, (lec["loss_step1"], eager["loss_step1"])
    assert lec["lora_linears_fused"] == 12  # per layer: q, k, v, o and the experts' gate_up and down


def test_layer_breaks_case_compiles_a_graph_per_layer_and_still_rewrites_each():
    case = e2e.Case("tiny-llama", "lora", 2, 32, layer_breaks=True)
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "lecompile-d1")]
    eager, lec = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    assert "error" not in lec, lec.get("error")
    assert case.name.endswith("layer-breaks") and lec["layer_breaks"] is True
    assert lec["graphs_compiled"] > 2  # without the breaks: 1
    assert lec["loss_matches_eager"] is True, (lec["loss_step1"], eager["loss_step1"])
    assert lec["mlp_matched"] == 2 and lec["lora_linears_fused"] == 14  # 7 LoRA linears per layer, as unbroken


def test_padded_batches_keep_a_token_mask_for_attn_mask_blocks():
    chosen = [v for v in e2e.variants(densities=(1.0,), mask_blocks=True, attn_block=16)
              if v.name in ("eager", "lecompile-d1-mask-blocks")]
    for padded, rewritten in ((False, 0), (True, 2)):  # unpadded: the causal-only mask is dropped instead
        case = e2e.Case("tiny-llama", "lora", 2, 64, padded=padded)
        eager, lec = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
        assert lec.get("attention_rewritten") == rewritten and lec["padded"] is padded, lec
        assert lec["loss_matches_eager"] is True, (lec["loss_step1"], eager["loss_step1"])
    assert case.name.endswith("padded")
    inputs = e2e.batch_inputs(case, 100, "cpu")
    assert inputs["attention_mask"][-1, :16].sum() == 0 and inputs["attention_mask"][:, 16:].all()
    assert (inputs["labels"][-1, :17] == -100).all() and (inputs["labels"][0] >= 0).all()


def test_sparse_attention_variant_rewrites_attention(tmp_path):
    case = e2e.Case("tiny-llama", "lora", 2, 64)
    chosen = [v for v in e2e.variants(densities=(0.5,), baselines=False, attn_densities=(1.0, 0.5), attn_block=16)]
    assert [v.name for v in chosen] == ["lecompile-d0.5", "lecompile-d0.5-a0.5"]
    rows = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    assert [r.get("attention_rewritten") for r in rows] == [0, 2], rows
    assert rows[1]["attn_density"] == 0.5 and rows[1]["attn_kernel"] == "triton" and "attn_kernel" not in rows[0]
    e2e.plot(rows, tmp_path / "e2e.png")


def test_attention_kernels_make_variants_of_their_own():
    names = {v.name: v.config.tuning.attn_kernel for v in e2e.variants(
        densities=(1.0,), baselines=False, attn_densities=(1.0, 0.5), quality_settings=["attn-0.5", "default"],
        attn_kernels=("triton", "flash"), cudagraphs=True) if v.config is not None}
    assert names == {"lecompile-d1": "triton", "lecompile-d1-a0.5": "triton", "lecompile-d1-a0.5-flash": "flash",
                     "lecompile-attn-0.5": "triton", "lecompile-attn-0.5-flash": "flash", "lecompile-default": "triton",
                     "lecompile-d1-cg": "triton", "lecompile-d1-a0.5-cg": "triton",
                     "lecompile-d1-a0.5-flash-cg": "flash",
                     "lecompile-attn-0.5-cg": "triton", "lecompile-attn-0.5-flash-cg": "flash",
                     "lecompile-default-cg": "triton"}
    exact = e2e.variants(densities=(1.0,), baselines=False, attn_kernels=("triton", "flash"), mask_blocks=True,
                         cudagraphs=True)
    assert [(v.name, v.config.tuning.attn_kernel, v.config.tuning.attn_mask_blocks) for v in exact] == [
        ("lecompile-d1", "triton", False), ("lecompile-d1-mask-blocks", "triton", True),
        ("lecompile-d1-cg", "triton", False), ("lecompile-d1-mask-blocks-cg", "triton", True)]
    for owned in ("attn_kernel", "attn_mask_blocks"):
        with pytest.raises(ValueError, match=rf"settings \['{owned}'\] are set per variant"):
            e2e.variants(densities=(1.0,), settings={owned: True})
    with pytest.raises(SystemExit):  # argparse names the choices
        e2e.main(["--models", "tiny-llama", "--attn-kernels", "cute", "--out", "unused"])


def test_training_step_trains_the_adapters_through_lecompile():
    """``training_step`` (the step ``benchmarks.step_breakdown`` profiles): the same ids give a new loss once the
    optimizer has moved the adapters (LoRA without dropout: nothing else changes between calls)."""
    case = e2e.Case("tiny-llama", "lora", 2, 32)
    variant = next(v for v in e2e.variants(densities=(1.0,), baselines=False) if v.name == "lecompile-d1")
    step = e2e.training_step(case, variant, "cpu")
    first, second = step(), step()
    assert torch.isfinite(first) and not torch.equal(first, second)


def test_cases_that_cannot_run_are_recorded_not_dropped():
    case = e2e.Case("tiny-llama", "bitfit", 2, 32)  # LLaMA has no biases
    rows = e2e.run_case(case, e2e.variants(densities=(1.0,), baselines=False), "cpu", steps=1, warmup=0)
    assert rows and all("no biases" in r["error"] for r in rows)


def test_settings_reach_every_lecompile_variant_and_no_baseline():
    vs = e2e.variants(densities=(1.0, 0.5), settings={"svd_rank": 4, "disable": frozenset({"fuse_loss"})})
    lec = [v for v in vs if v.backend == "lecompile"]
    assert lec and all(v.config.tuning.svd_rank == 4 and not v.config.enabled("fuse_loss") for v in lec)
    assert all(v.config is None or v.config.tuning.svd_rank == 8 for v in vs if v.backend != "lecompile")


def test_without_adds_each_density_variant_again_with_that_pass_off():
    vs = e2e.variants(densities=(1.0, 0.5), baselines=False, cudagraphs=True, without=["rotary_tables"],
                      settings={"disable": frozenset({"fuse_loss"})})
    assert [(v.name, v.without) for v in vs] == [
        ("lecompile-d1", None), ("lecompile-d1-without-rotary_tables", "rotary_tables"),
        ("lecompile-d0.5", None), ("lecompile-d0.5-without-rotary_tables", "rotary_tables"),
        ("lecompile-d1-cg", None), ("lecompile-d1-without-rotary_tables-cg", "rotary_tables"),
        ("lecompile-d0.5-cg", None), ("lecompile-d0.5-without-rotary_tables-cg", "rotary_tables")]
    for v in vs:
        assert v.config.enabled("rotary_tables") == (v.without is None) and not v.config.enabled("fuse_loss")
    rows = e2e.run_case(e2e.Case("tiny-llama", "lora", 2, 32), vs[:2], "cpu", steps=1, warmup=0)
    assert rows[1]["without"] == "rotary_tables" and "without" not in rows[0]
    assert rows[0]["rewrites"]["rotary_tables"] > 0 and "rotary_tables" not in rows[1]["rewrites"]
    assert rows[1]["speedup_vs_d1"] == round(rows[0]["ms"] / rows[1]["ms"], 3)
    with pytest.raises(SystemExit):  # argparse names the passes
        e2e.main(["--models", "tiny-llama", "--without", "fold_adapters", "--out", "unused"])


def test_settings_that_variants_own_are_refused():
    with pytest.raises(ValueError, match=r"settings \['mlp_density'\] are set per variant"):
        e2e.main(["--models", "tiny-llama", "--set", "mlp_density=0.3", "--out", "unused"])


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="unknown variants"):
        e2e.main(["--models", "tiny-llama", "--variants", "fastest", "--out", "unused"])


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_bottleneck_adapter_method_keeps_the_mlps_rewritable(name):
    case = e2e.Case(name, "adapter", 2, 32)
    chosen = [v for v in e2e.variants(densities=(1.0, 0.5)) if v.name in ("eager", "lecompile-d1", "lecompile-d0.5")]
    rows = e2e.run_case(case, chosen, "cpu", steps=1, warmup=0)
    eager, dense, sparse = rows
    assert "error" not in sparse, sparse.get("error")
    assert dense["loss_matches_eager"] is True
    assert sparse["mlp_rewritten"] == 2, sparse
    model = e2e.build(case, chosen[0], "cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n for n in trainable), sorted(trainable)


def test_norms_method_gives_lora_rows_their_adapter_share():
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "lecompile-d1")]
    rows = []
    for method in ("lora", "norms"):
        rows += e2e.run_case(e2e.Case("tiny-llama", method, 2, 32), chosen, "cpu", steps=1, warmup=0)
    e2e.add_adapter_shares(rows)
    lora = [r for r in rows if r["method"] == "lora"]
    norms = {r["variant"]: r["ms"] for r in rows if r["method"] == "norms"}
    assert all(r["adapter_share"] == pytest.approx(1 - norms[r["variant"]] / r["ms"], abs=1e-3) for r in lora)
    model = e2e.build(e2e.Case("tiny-llama", "norms", 2, 32), chosen[0], "cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("norm" in n for n in trainable), trainable


def test_layers_option_builds_fewer_layers_and_names_them():
    case = e2e.Case("tiny-opt", "lora", 2, 32, layers=1)
    model = e2e.build(case, e2e.Variant("eager", "eager"), "cpu")
    assert model.config.num_hidden_layers == 1 and case.name == "tiny-opt (1 layers) lora 2x32"
    with pytest.raises(ValueError, match="--layers must be >= 1, got 0"):
        e2e.main(["--models", "tiny-opt", "--layers", "0", "--out", "unused"])


def test_merge_runs_numbers_the_run_and_fills_in_ratios():
    from benchmarks.merge_runs import merge
    results = {"meta": {"benchmark": "e2e", "runs": [{"run": 1}]}, "rows": [{"run": 1, "variant": "eager"}]}
    row = dict(case="m lora 8x512", model="m", method="lora", layers=2, batch=8, seq=512, mlp_density=1.0,
               attn_density=1.0, peak_mem_gib=1.0, loss_step1=1.0)
    new = {"meta": {"benchmark": "e2e", "command": "python benchmarks/e2e.py", "git_commit": "abc-dirty"},
           "rows": [dict(row, variant="eager", ms=20.0), dict(row, variant="inductor", ms=10.0)],
           "breakdown": [{"case": "m lora 8x512", "mlp": 1.0}]}
    assert merge(results, new, "a run cut short", commit="def") == 2
    assert results["breakdown"] == [{"run": 2, "case": "m lora 8x512", "mlp": 1.0}]
    assert results["meta"]["runs"][-1] == {"run": 2, "what": "a run cut short", "command": "python benchmarks/e2e.py",
                                           "date": None, "git_commit": "def", "device": None, "torch": None,
                                           "triton": None}
    eager = results["rows"][1]
    assert eager["run"] == 2 and eager["speedup"] == 0.5 and eager["loss_matches_eager"] is True
    with pytest.raises(ValueError, match="cannot merge a 'sparse_mlp' run into 'e2e'"):
        merge(results, {"meta": {"benchmark": "sparse_mlp"}, "rows": []}, "x")


def test_density_curves_use_the_cuda_graph_variants_with_dense_attention():
    row = dict(case="m", attn_density=1.0)
    latest = {("m", "lecompile-d1-cg"): dict(row, mlp_density=1.0, speedup_vs_strongest=0.98),
              ("m", "lecompile-d0.25-cg"): dict(row, mlp_density=0.25, speedup_vs_strongest=1.2),
              ("m", "lecompile-d0.25"): dict(row, mlp_density=0.25, speedup_vs_strongest=0.3),
              ("m", "lecompile-d0.25-a0.5-cg"): dict(row, mlp_density=0.25, attn_density=0.5,
                                                     speedup_vs_strongest=1.1),
              ("one", "lecompile-d1-cg"): dict(row, case="one", mlp_density=1.0, speedup_vs_strongest=1.0)}
    assert e2e.density_curves(latest, ["m", "one"]) == {"m": [(0.25, 1.2), (1.0, 0.98)]}


def test_models_get_a_loss_type_so_the_loss_stays_in_the_graph():
    model = e2e.build(e2e.Case("tiny-gpt2", "lora", 2, 32), e2e.Variant("eager", "eager"), "cpu")
    assert model.get_base_model().loss_type == "ForCausalLM"


def test_inductor_options_hold_for_the_whole_run_and_are_recorded(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config
    seen, run_case = [], e2e.run_case

    def spy(*args, **kwargs):
        seen.append(inductor_config.combo_kernels)
        return run_case(*args, **kwargs)

    monkeypatch.setattr(e2e, "run_case", spy)
    e2e.main(["--models", "tiny-llama", "--variants", "eager", "--steps", "1", "--warmup", "0",
              "--inductor-option", "combo_kernels=true", "--out", str(tmp_path)])
    assert seen == [True] and inductor_config.combo_kernels is False
    meta = json.loads((tmp_path / "e2e.json").read_text())["meta"]
    assert meta["settings"]["inductor_options"] == {"combo_kernels": True}


def test_inductor_options_are_typed_and_unknown_keys_named():
    assert e2e.parse_inductor_options(["combo_kernels=True", "max_autotune_gemm_backends=TRITON",
                                       "combo_kernel_allow_mixed_sizes=2", "triton.cudagraphs=false"]) == {
        "combo_kernels": True, "max_autotune_gemm_backends": "TRITON", "combo_kernel_allow_mixed_sizes": 2,
        "triton.cudagraphs": False}
    with pytest.raises(ValueError, match="'fastest=1' is not KEY=VALUE"):
        e2e.parse_inductor_options(["fastest=1"])
    with pytest.raises(ValueError, match="'combo_kernels=2': combo_kernels takes bool values"):
        e2e.parse_inductor_options(["combo_kernels=2"])
    with pytest.raises(ValueError, match="combo_kernel_allow_mixed_sizes takes int values"):
        e2e.parse_inductor_options(["combo_kernel_allow_mixed_sizes=yes"])
    # typed by the option, not by the text: a string option keeps a numeric-looking value
    assert e2e.parse_inductor_options(["max_autotune_gemm_backends=1"]) == {"max_autotune_gemm_backends": "1"}


def test_limit_counts_frozen_weights_and_causal_attention_at_the_gpus_rate(monkeypatch):
    case = e2e.Case("tiny-llama", "lora", 2, 32)
    variant = next(v for v in e2e.variants(densities=(1.0,), baselines=False) if v.name == "lecompile-d1")
    model = e2e.build(case, variant, "cpu")
    assert e2e.limit_ms(model, case, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    hidden, ffn, kv, vocab, layers = 64, 256, 32, 256, 2  # tiny-llama: 4 heads of 16, 2 key/value heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    tokens = case.batch * case.seq
    flops = 4 * (layers * per_layer + vocab * hidden) * tokens + 6 * layers * case.batch * case.seq ** 2 * hidden
    assert e2e.limit_ms(model, case, "cuda") == pytest.approx(flops / 790e12 * 1e3)
    lora = 16 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + ffn))  # r (in + out), every linear
    assert e2e.step_flops(model, case)["adapter_gemm"] == 6 * layers * lora * tokens
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert e2e.limit_ms(model, case, "cuda") is None


def test_step_flops_count_moe_experts_at_the_routed_share():
    """tiny-mixtral: 4 experts, 2 per token; PEFT's LoRA also on the stacked experts and the router."""
    case = e2e.Case("tiny-mixtral", "lora", 2, 32)
    model = e2e.build(case, e2e.Variant("eager", "eager"), "cpu")
    hidden, ffn, kv, vocab, layers, experts, routed = 64, 256, 32, 256, 2, 4, 2
    attention = 2 * hidden * hidden + 2 * hidden * kv
    per_layer = attention + routed * 3 * hidden * ffn  # each token's experts: gate_up and down
    tokens = case.batch * case.seq
    flops = e2e.step_flops(model, case)
    assert flops["base_gemm"] == 4 * (layers * per_layer + vocab * hidden) * tokens
    # r (in + out) per routed expert; PEFT gives the fused gate_up projection rank 2r
    lora_experts = routed * (32 * (hidden + 2 * ffn) + 16 * (ffn + hidden))
    lora_router = 16 * (hidden + experts)
    lora = 16 * (2 * (hidden + hidden) + 2 * (hidden + kv)) + lora_experts + lora_router
    assert flops["adapter_gemm"] == pytest.approx(6 * layers * lora * tokens)


def test_a_quality_setting_runs_its_whole_schedule_and_carries_its_measured_quality(monkeypatch):
    measured = {"setting": "schedule-learned-0.5", "steps": 20, "heldout_delta": 0.0078, "passes": True, "seeds": 3}
    monkeypatch.setattr(e2e, "quality_summary", lambda setting, seq=None: {**measured, "seq": 256})
    (variant,) = e2e.variants(densities=(), baselines=False, quality_settings=["schedule-learned-0.5"])
    assert variant.name == "lecompile-schedule-learned-0.5"
    assert (variant.config.total_steps, variant.config.dense_warmup_steps) == (20, 2)  # as quality measured it
    case = e2e.Case("tiny-llama", "lora", 2, 64, layers=4)  # the setting keeps the first 3 layers dense
    (row,) = e2e.run_case(case, [variant], "cpu", steps=1, warmup=1)
    assert "error" not in row, row.get("error")
    assert row["mlp_rewritten"] == 1  # the fourth layer
    assert row["quality_setting"] == "schedule-learned-0.5"
    assert (row["heldout_delta"], row["quality_passes"], row["quality_seeds"], row["quality_seq"]) == (
        0.0078, True, 3, 256)
    assert row["schedule_ms"] == pytest.approx((2 * row["warmup_ms"] + 18 * row["mean_ms"]) / 20, abs=2e-3)
    strongest = {"variant": "inductor-bf16-adapters", "ms": 2 * row["ms"], "mlp_density": 1.0, "attn_density": 1.0,
                 "peak_mem_gib": 1.0, "loss_step1": 1.0}
    e2e.add_ratios([strongest, row])
    assert row["schedule_speedup_vs_strongest"] == pytest.approx(strongest["ms"] / row["schedule_ms"], rel=1e-3)


@pytest.mark.parametrize("setting", ["dense", "no-such-setting"])
def test_a_setting_that_is_no_lecompile_config_is_refused_by_name(setting):
    with pytest.raises(ValueError, match=f"{setting!r} is not a lecompile setting.*schedule-learned-0.5"):
        e2e.variants(densities=(), baselines=False, quality_settings=[setting])


def test_an_attention_setting_takes_its_quality_from_the_long_context_results(monkeypatch, tmp_path):
    def measured(seq, delta):
        return json.dumps({"meta": {"seq": seq}, "summary": [
            {"setting": "attn-0.5", "steps": 300, "heldout_delta": delta, "passes": True}]})

    (tmp_path / "quality_recall.json").write_text(measured(4096, 0.004))
    (tmp_path / "quality_recall_8192.json").write_text(measured(8192, 0.008))
    monkeypatch.setattr(e2e, "RESULTS", tmp_path)
    (variant,) = e2e.variants(densities=(), baselines=False, quality_settings=["attn-0.5"])
    assert (variant.name, variant.config.attn_density, variant.config.mlp_density) == ("lecompile-attn-0.5", 0.5, 1.0)
    assert e2e.quality_summary("attn-0.5")["heldout_delta"] == 0.004
    # A row's own length where it was measured, else the task's: the row says which.
    assert (e2e.quality_summary("attn-0.5", 8192)["heldout_delta"], e2e.quality_summary("attn-0.5", 8192)["seq"]) == (
        0.008, 8192)
    assert e2e.quality_summary("attn-0.5", 16384)["seq"] == 4096
    assert e2e.quality_summary("schedule-learned-0.5") is None  # no quality.json in this folder


def test_sparse_rows_compare_with_the_exact_variant_of_the_same_replay():
    def row(variant, ms, peak, reserved, cudagraphs):
        return dict(variant=variant, ms=ms, peak_mem_gib=peak, peak_reserved_gib=reserved, cudagraphs=cudagraphs,
                    mlp_density=1.0, attn_density=1.0, loss_step1=1.0)

    rows = [row("lecompile-d1", 60.0, 4.0, 5.0, False), row("lecompile-d1-cg", 50.0, 2.0, 8.0, True),
            row("lecompile-schedule-learned-0.5", 48.0, 5.0, 9.0, False),
            row("lecompile-schedule-learned-0.5-cg", 40.0, 6.0, 12.0, True)]
    e2e.add_ratios(rows)
    # Without CUDA graphs the allocator's peak; with them, what was reserved (their pools escape the peak).
    assert [(r.get("speedup_vs_d1"), r.get("mem_vs_d1")) for r in rows] == [
        (None, None), (None, None), (1.25, 1.25), (1.25, 1.5)]
