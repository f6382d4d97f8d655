"""The attention benchmark's CPU-side parts: its FlexAttention option override, its band layout, its arms."""

import pytest
import torch

from benchmarks import bench_sparse_attention as bench
from lecompile.ops import block_attention


def test_flex_options_parse_as_bools_and_ints():
    assert bench.parse_flex_options(["USE_TMA=true", "fwd_num_warps=8"]) == {"USE_TMA": True, "fwd_num_warps": 8}
    for bad in ("USE_TMA", "BLOCK_M=big"):
        with pytest.raises(ValueError, match=f"'{bad}' is not KEY=VALUE with VALUE true, false or an integer"):
            bench.parse_flex_options([bad])


def test_extra_flex_options_reach_the_backend_s_calls_and_go_away_after():
    own = block_attention.kernel_options(64)
    with bench.extra_flex_options({"USE_TMA": True, "fwd_BLOCK_M": 32}):
        assert block_attention.kernel_options(64) == {**own, "USE_TMA": True, "fwd_BLOCK_M": 32}
    assert block_attention.kernel_options(64) == own


@pytest.mark.parametrize("n", [1, 7, 64, 256])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 1.0])
def test_the_band_is_the_narrowest_that_keeps_the_density(n, density):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    band = bench.band_blocks(causal, density)
    w = bench.band_width(n, density)
    assert band.sum() >= density * causal.sum()
    narrower = causal & (torch.arange(n)[:, None] - torch.arange(n)[None, :] < w - 1)
    assert w == 1 or narrower.sum() < density * causal.sum()
    assert band.diagonal().all() and not (band & ~causal).any()
    assert band[:, 0].sum() == min(w, n), "the first key block is read by the band's w query blocks only"


def test_the_band_replaces_the_predictor_in_the_backends_graph():
    import lecompile
    from lecompile import LongExposureConfig
    from lecompile.ops.block_attention import allowed_blocks, block_attention_ref
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 16, requires_grad=True) for h in (4, 2, 2))  # training: rewritten
    backend = lecompile.longexposure(LongExposureConfig.create(attn_density=0.25, attn_block=16))
    torch._dynamo.reset()
    with bench.band_layout():
        out = torch.compile(bench.causal_sdpa, backend=backend, fullgraph=True)(q, k, v)
    assert backend.report.attention_rewritten == 1
    keep = bench.band_blocks(allowed_blocks(["mul"], [0.25], True, 64, 64, 16, "cpu")[0], 0.25).expand(1, 4, -1, -1)
    torch.testing.assert_close(out, block_attention_ref(q, k, v, keep, ["mul"], [0.25], True, 16, enable_gqa=True))
    assert not torch.allclose(out, bench.causal_sdpa(q, k, v), atol=1e-3), "the band had no effect: cannot fail"


def test_arms_parse_into_settings_and_a_layout():
    assert bench.parse_arm("default") == ({}, "predicted")
    assert bench.parse_arm("attn_expand_kv=true") == ({"attn_expand_kv": True}, "predicted")
    assert bench.parse_arm("layout=band,attn_kernel=triton") == ({"attn_kernel": "triton"}, "band")
    assert bench.parse_arm("mlp_layer_densities=1.0,0.5,layout=band") == ({"mlp_layer_densities": (1.0, 0.5)}, "band")


def test_set_values_with_commas_stay_whole_without_arms():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):  # parsed and checked, then the GPU check
        bench.main(["--set", "mlp_layer_densities=1.0,1.0", "disable=fuse_loss,norms_from_output"])


def test_density_one_is_timed_once_whatever_the_arms():
    default, expand = ({}, "predicted"), ({"attn_expand_kv": True}, "predicted")
    assert bench.arm_points([default, expand], [1.0, 0.5]) == [(default, 1.0), (default, 0.5), (expand, 0.5)]
    blocks = ({"attn_mask_blocks": True}, "predicted")  # rewrites density 1.0 too: timed there
    assert bench.arm_points([default, blocks], [1.0]) == [(default, 1.0), (blocks, 1.0)]


def test_the_masked_sdpa_at_density_one_becomes_exact_blocks_with_attn_mask_blocks():
    import lecompile
    from lecompile import LongExposureConfig
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 16, requires_grad=True) for h in (4, 2, 2))
    mask = torch.ones(64, 64, dtype=torch.bool).tril()[None, None]
    for settings, rewritten in (({}, 0), ({"attn_mask_blocks": True}, 1)):
        backend = lecompile.longexposure(LongExposureConfig.create(attn_block=16, **settings))
        torch._dynamo.reset()
        out = torch.compile(bench.masked_sdpa, backend=backend, fullgraph=True)(q, k, v, mask)
        assert backend.report.attention_rewritten == rewritten, str(backend.report)
        torch.testing.assert_close(out, bench.causal_sdpa(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [("layout=diagonal", "at most one layout"),
                                        ("layout=band,layout=predicted", "at most one layout"),
                                        ("attn_kernel=cuda", "attn_kernel")])
def test_a_bad_arm_names_itself_before_any_gpu_work(bad, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_arm(bad)
    with pytest.raises(ValueError, match=match):  # before the GPU check, which exits on this machine
        bench.main(["--arms", "default", bad])


def test_a_run_of_experiments_only_draws_no_plot(tmp_path):
    masked = {"case": "llama-3-8b attention", "seq": 8192, "density": 1.0, "pass": "fwd+bwd", "ms": 11.2,
              "masked": True, "settings": {"attn_mask_blocks": True}}
    assert not bench.plot([masked], tmp_path / "sparse_attention.png")
    assert not (tmp_path / "sparse_attention.png").exists()
