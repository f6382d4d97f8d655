"""The attention benchmark's CPU-side parts: its FlexAttention option override, its plotted rows."""

import pytest

from benchmarks import bench_sparse_attention as bench
from lecompile.ops import block_attention


def test_flex_options_parse_as_bools_and_ints():
    assert bench.parse_flex_options(["USE_TMA=true", "fwd_num_warps=8"]) == {"USE_TMA": True, "fwd_num_warps": 8}
    for bad in ("USE_TMA", "BLOCK_M=big"):
        with pytest.raises(ValueError, match=f"'{bad}' is not KEY=VALUE with VALUE true, false or an integer"):
            bench.parse_flex_options([bad])


def test_flex_options_name_the_implementation():
    assert bench.parse_flex_options(["BACKEND=FLASH", "USE_TMA=false"]) == {"BACKEND": "FLASH", "USE_TMA": False}
    with pytest.raises(ValueError, match=r"'BACKEND=CUTE': BACKEND must be one of \('AUTO', 'TRITON', 'FLASH'"):
        bench.parse_flex_options(["BACKEND=CUTE"])


def test_extra_flex_options_reach_the_backend_s_calls_and_go_away_after():
    own = block_attention.kernel_options(64)
    with bench.extra_flex_options({"USE_TMA": True, "fwd_BLOCK_M": 32}):
        assert block_attention.kernel_options(64) == {**own, "USE_TMA": True, "fwd_BLOCK_M": 32}
    assert block_attention.kernel_options(64) == own


def test_the_plot_shows_each_point_of_the_latest_run_that_timed_it():
    row = dict(case="llama-3-8b attention", density=0.5, seq=8192, variant="lecompile", ms=1.0)
    rows = [{**row, "run": 3, "pass": "fwd+bwd"}, {**row, "run": 5, "pass": "fwd+bwd"},
            {**row, "run": 5, "pass": "fwd"}, {**row, "run": 6, "pass": "fwd+bwd", "autotuned": True},
            {**row, "run": 4, "pass": "fwd+bwd", "seq": 16384}, {**row, "run": 7, "pass": "fwd+bwd", "error": "x"}]
    rows[-1].pop("ms")
    assert sorted((r["seq"], r["run"]) for r in bench.latest_timed(rows)) == [(8192, 5), (16384, 4)]
