"""The step breakdown's sorting of GPU kernels into parts (``benchmarks/step_breakdown.py``; it
runs on a GPU, so the kernels here are made up, with the profiler's field names)."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks import e2e, step_breakdown


def op(name, shapes=(), parent=None, kernels=()):
    return SimpleNamespace(name=name, input_shapes=list(shapes), cpu_parent=parent,
                           kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels])


def test_kernels_go_to_their_parts():
    step = op("CompiledFunction")
    optimizer = op("Optimizer.step#AdamW.step")
    events = [
        op("aten::mm", [[4096, 2048], [2048, 8192]], step, [("nvjet_tst_256x128", 3000.0)]),
        op("aten::mm", [[4096, 2048], [2048, 16]], step, [("nvjet_tst_32x64", 200.0)]),
        op("aten::addmm", [[16], [4096, 2048], [2048, 48]], step, [("nvjet_tst_8x64", 100.0)]),
        op("aten::_scaled_dot_product_cudnn_attention", [], step, [("cudnn_flash_fprop", 900.0)]),
        op("lecompile::lm_head_cross_entropy", [], step, [("_cross_entropy_kernel", 50.0)]),
        op("aten::_foreach_add_", [], optimizer, [("multi_tensor_apply_kernel", 60.0)]),
        op("CompiledFunction", [], None, [("triton_red_fused_add_rms_norm_0", 400.0),
                                          ("triton_tem_fused_flex_attention_1", 700.0),
                                          ("_linear_low_rank_kernel", 1000.0), ("ncclKernel", 30.0)]),
        op("aten::copy_", [], step, [("direct_copy_kernel_cuda", 80.0)]),
        op("aten::add", [], step),  # launched nothing
        # MoE experts: [tokens, K] @ [experts, K, N] with offsets; LoRA's rank-8 products are adapters'
        op("aten::_grouped_mm", [[4096, 2048], [8, 2048, 1024], [8]], step, [("grouped_gemm", 600.0)]),
        op("aten::_grouped_mm", [[4096, 2048], [8, 2048, 8], [8]], step, [("grouped_gemm_small", 40.0)]),
        op("aten::mm", [[4096, 512], [512, 2048]], op("lecompile::sparse_mlp", [], step), [("gather_gemm", 500.0)]),
        op("aten::topk", [], op("lecompile::predict_neurons", [], step), [("topk_kernel", 20.0)]),
    ]
    parts = step_breakdown.sort_kernels(SimpleNamespace(events=lambda: events), steps=2)
    assert parts == {"base_gemm": 2.3, "adapter_gemm": 0.17, "sparse_mlp": 0.25, "predictor": 0.01, "attention": 0.8,
                     "loss": 0.025, "optimizer": 0.03, "elementwise": 0.24, "rest": 0.015}


def test_a_real_profile_has_the_fields_it_reads():
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x @ x
    assert step_breakdown.sort_kernels(prof, steps=1) == dict.fromkeys(step_breakdown.PARTS, 0.0)
    (mm,) = [op for op in step_breakdown.top_host_ops(prof, steps=1) if op["name"] == "aten::mm"]
    assert mm["calls"] == 1 and 0 < mm["self_ms"] <= mm["total_ms"]


def test_top_host_ops_are_the_host_events_with_the_most_self_time_per_step():
    def event(key, device, self_us, total_us, count):
        return SimpleNamespace(key=key, device_type=SimpleNamespace(name=device), self_cpu_time_total=self_us,
                               cpu_time_total=total_us, count=count)

    events = [event("aten::mm", "CPU", 400.0, 600.0, 4), event("gemm_kernel", "CUDA", 9000.0, 0.0, 4),
              event("lecompile::lm_head_cross_entropy", "CPU", 1000.0, 3000.0, 2),
              event("aten::add", "CPU", 10.0, 10.0, 2)]
    top = step_breakdown.top_host_ops(SimpleNamespace(key_averages=lambda: events), steps=2, n=2)
    assert top == [dict(name="lecompile::lm_head_cross_entropy", self_ms=0.5, total_ms=1.5, calls=1.0),
                   dict(name="aten::mm", self_ms=0.2, total_ms=0.3, calls=2.0)]


def test_refuses_a_device_without_kernels():
    variant = next(v for v in e2e.variants(densities=(1.0,), baselines=False) if v.name == "lecompile-d1")
    with pytest.raises(ValueError, match="run it on a CUDA device"):
        step_breakdown.profile_variant(e2e.Case("tiny-llama", "lora", 2, 32), variant, "cpu")


def test_unknown_variants_are_named():
    with pytest.raises(ValueError, match=r"unknown variants \['lecompile-d0.5'\]; with these densities"):
        step_breakdown.main(["--variants", "lecompile-d0.5", "--out", "unused"])


def test_a_quality_setting_is_a_variant_to_profile():
    with pytest.raises(ValueError, match="run it on a CUDA device"):  # known, and built before profiling
        step_breakdown.main(["--quality-settings", "schedule-learned-0.5", "--variants",
                             "lecompile-schedule-learned-0.5", "--models", "tiny-llama", "--device", "cpu",
                             "--out", "unused"])


def test_quality_settings_are_profiled_without_naming_their_variants(monkeypatch, tmp_path):
    """``--quality-settings X`` alone profiles X beside the default variants (it once profiled the
    defaults only, on the GPU, unless ``--variants`` named X too)."""
    profiled = []

    def profile(case, variant, device, steps):
        profiled.append(variant.name)
        return {}

    monkeypatch.setattr(step_breakdown, "profile_variant", profile)
    monkeypatch.setattr(step_breakdown, "plot", lambda rows, path: None)
    step_breakdown.main(["--quality-settings", "schedule-learned-0.5", "--models", "tiny-llama", "--out",
                         str(tmp_path)])
    assert profiled == [*step_breakdown.VARIANTS, "lecompile-schedule-learned-0.5"]


def test_lora_gemm_kernels_are_named_as_defined():
    """A renamed kernel would fall into ``rest`` unnoticed (it once did: the LoRA-in-GEMM kernel's
    time showed as 'rest' in the first H200 breakdown)."""
    from lecompile.kernels import lowrank_gemm
    assert all(hasattr(lowrank_gemm, name) for name in step_breakdown.LORA_GEMM_KERNELS)


def test_sparse_mlp_work_counts_each_group_reading_its_own_rows():
    from lecompile import LongExposureConfig
    from lecompile.report import MLPEntry
    config = LongExposureConfig.create(mlp_density=0.5, granularity="tile", tile_size=64, dense_output_share=0.5)
    gated = MLPEntry("layers.3.mlp", "silu_gated", [], ffn=1024, k=512, density=0.5, granularity="tile",
                     rewritten=True)
    dense = MLPEntry("layers.0.mlp", "silu_gated", [], ffn=1024, k=1024, density=1.0, granularity="tile",
                     rewritten=False)
    work = step_breakdown.sparse_mlp_work([gated, dense], config, e2e.Case("tiny-llama", "lora", 2, 256), hidden=256)
    # 512 tokens: 8 tiles of 64, 4 dense (all neurons), 4 at 512 neurons; 3 projections
    assert work["flops"] == 4 * 64 * 256 * 3 * (4 * 1024 + 4 * 512)
    assert work["dense_flops"] == 4 * 512 * 256 * 3 * 1024
    assert work["weight_bytes"] == 2 * 2 * 3 * 256 * (1024 + 4 * 512)


def test_a_sparse_variant_moves_its_mlps_from_the_base_gemm_limit_to_its_own(monkeypatch):
    case = e2e.Case("tiny-llama", "lora", 2, 64)
    dense, sparse = (next(v for v in e2e.variants(densities=(1.0, 0.5), baselines=False) if v.name == name)
                     for name in ("lecompile-d1", "lecompile-d0.5"))
    monkeypatch.setattr(e2e, "gemm_rate", lambda device: 1.0)  # TFLOP/s
    monkeypatch.setattr(step_breakdown, "hbm_bandwidth", lambda device: 1e9)  # bytes/s
    limits = {}
    for variant in (dense, sparse):
        step = e2e.training_step(case, variant, "cpu")
        step()
        limits[variant.name] = step_breakdown.limits_ms(step, case, "cpu")
    assert "sparse_mlp" not in limits["lecompile-d1"]
    # tiny-llama: 2 gated MLPs of 256 neurons over 64 hidden; 2 sequences of 64 tokens, 128 neurons each
    moved = limits["lecompile-d1"]["base_gemm"] - limits["lecompile-d0.5"]["base_gemm"]
    assert moved == pytest.approx(2 * 4 * 128 * 64 * 3 * 256 / 1e12 * 1e3, abs=2e-3)
    # bound by the weight rows: each sequence reads its own 128 rows of 3 weights, in both passes
    assert limits["lecompile-d0.5"]["sparse_mlp"] == pytest.approx(2 * 2 * 2 * 3 * 64 * 2 * 128 / 1e9 * 1e3,
                                                                   abs=2e-3)


def test_mask_blocks_variants_are_profiled_beside_their_density(monkeypatch, tmp_path):
    profiled = []
    monkeypatch.setattr(step_breakdown, "profile_variant", lambda case, variant, device, steps: profiled.append(
        (variant.name, variant.config.tuning.attn_mask_blocks)) or {})
    monkeypatch.setattr(step_breakdown, "plot", lambda rows, path: None)
    step_breakdown.main(["--mask-blocks", "--variants", "lecompile-d1", "lecompile-d1-mask-blocks", "--models",
                         "tiny-llama", "--out", str(tmp_path)])
    assert profiled == [("lecompile-d1", False), ("lecompile-d1-mask-blocks", True)]


def test_settings_and_layers_reach_the_lecompile_variants(monkeypatch, tmp_path):
    profiled = []
    monkeypatch.setattr(step_breakdown, "profile_variant", lambda case, variant, device, steps: profiled.append(
        (case.layers, variant.name, variant.config and variant.config.tuning.lora_in_gemm)) or {})
    monkeypatch.setattr(step_breakdown, "plot", lambda rows, path: None)
    step_breakdown.main(["--layers", "1", "--set", "lora_in_gemm=false", "--models", "tiny-llama", "--out",
                         str(tmp_path)])
    assert profiled == [(1, "inductor-bf16-adapters", None), (1, "lecompile-d1", False)]
    with pytest.raises(ValueError, match="--layers must be >= 1, got 0"):
        step_breakdown.main(["--layers", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="'lora_in_gem=false' is not NAME=VALUE"):
        step_breakdown.main(["--set", "lora_in_gem=false", "--out", str(tmp_path)])


def test_host_counts_are_launches_and_waits_per_step():
    cpu = SimpleNamespace(name="CPU")

    def call(name, kernels=0):
        return SimpleNamespace(name=name, device_type=cpu, kernels=[object()] * kernels)

    events = [call("aten::mm", kernels=2), call("cudaLaunchKernel"), call("cudaLaunchKernel"),
              call("aten::_local_scalar_dense", kernels=1), call("cudaMemcpyAsync"), call("cudaStreamSynchronize"),
              call("cudaMemcpy"), call("cudaDeviceSynchronize")]  # the last: the one closing the profiled steps
    counts = step_breakdown.host_counts(SimpleNamespace(events=lambda: events), steps=2)
    assert counts == {"launches": 1.5, "syncs": 1.0}
    without_runtime = SimpleNamespace(events=lambda: events[:1])
    assert step_breakdown.host_counts(without_runtime, steps=1) == {"launches": 2.0, "syncs": None}
