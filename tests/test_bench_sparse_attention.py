"""The attention benchmark's CPU-side parts: its FlexAttention option override."""

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
