"""What the benchmarks share (``benchmarks/common.py``)."""

import time

from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from benchmarks.common import autotune_seconds, autotuning, jit_compiles


class _Tuner:
    """Stands in for a Triton autotuner: ``base_fn`` is the kernel's Python function, ``cache`` the
    config each key chose."""

    def __init__(self, fn, cache=None):
        self.base_fn = self.fn = fn
        self.cache = dict(cache or {})


def _kernel_a():
    pass


def _kernel_b():
    pass


def test_autotuning_adds_up_each_kernels_config_timings_and_restores_the_autotuner(monkeypatch):
    def bench(self, *args, config=None, **kwargs):
        time.sleep(0.01)
        if config == "last":  # the autotuner records the winner once every config is timed
            self.cache[(4096, "bf16")] = "BLOCK_M: 128"
        return [1.0]

    monkeypatch.setattr(Autotuner, "_bench", bench)
    a = _Tuner(_kernel_a, cache={(512, "bf16"): "BLOCK_M: 64"})  # tuned before the block
    b = _Tuner(_kernel_b)
    with autotuning() as tuned:
        for tuner, configs in ((a, ["first", "second", "last"]), (b, ["last"])):
            for config in configs:
                assert Autotuner._bench(tuner, config=config) == [1.0]
    assert Autotuner._bench is bench
    assert sorted(tuned) == ["_kernel_a", "_kernel_b"]
    assert tuned["_kernel_a"]["configs"] == 3 and tuned["_kernel_b"]["configs"] == 1
    assert tuned["_kernel_a"]["seconds"] >= 0.03 and tuned["_kernel_b"]["seconds"] >= 0.01
    assert tuned["_kernel_a"]["best"] == {"(4096, 'bf16')": "BLOCK_M: 128"}  # not the key tuned before
    assert autotune_seconds(tuned) == round(tuned["_kernel_a"]["seconds"] + tuned["_kernel_b"]["seconds"], 1)


class _Kernel:
    """Stands in for a Triton JIT function: ``__name__`` is its name."""

    def __init__(self, name):
        self.__name__ = name


def test_jit_compiles_adds_up_each_kernels_compiles_and_restores_triton(monkeypatch):
    def compile_(self, *args, **kwargs):
        time.sleep(0.01)
        return f"binary of {self.__name__}"

    monkeypatch.setattr(JITFunction, "_do_compile", compile_)
    a, b = _Kernel("_norm_kernel"), _Kernel("_loss_kernel")
    with jit_compiles() as compiled:
        for kernel in (a, a, b):
            assert JITFunction._do_compile(kernel, "key", "signature") == f"binary of {kernel.__name__}"
    assert JITFunction._do_compile is compile_
    assert {name: entry["compiles"] for name, entry in compiled.items()} == {"_norm_kernel": 2, "_loss_kernel": 1}
    assert compiled["_norm_kernel"]["seconds"] >= 0.02 and compiled["_loss_kernel"]["seconds"] >= 0.01


def test_results_keep_set_valued_settings_as_sorted_lists(tmp_path):
    import json

    from benchmarks.common import write_results
    from lecompile import LongExposureConfig
    settings = LongExposureConfig.parse_settings(["disable=rotary_tables,fuse_loss"])  # what e2e --set gives
    path = write_results("e2e", {"meta": {"lecompile_settings": settings}}, tmp_path)
    assert json.loads(path.read_text())["meta"]["lecompile_settings"] == {"disable": ["fuse_loss", "rotary_tables"]}
