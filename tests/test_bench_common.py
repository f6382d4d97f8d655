"""What the benchmarks share (``benchmarks/common.py``)."""

import time

from triton.runtime.autotuner import Autotuner

from benchmarks.common import autotuning


class _Tuner:
    """Stands in for a Triton autotuner: ``base_fn`` is the kernel's Python function."""

    def __init__(self, fn):
        self.base_fn = self.fn = fn


def _kernel_a():
    pass


def _kernel_b():
    pass


def test_autotuning_adds_up_each_kernels_config_timings_and_restores_the_autotuner(monkeypatch):
    def bench(self, *args, config=None, **kwargs):
        time.sleep(0.01)
        return [1.0]

    monkeypatch.setattr(Autotuner, "_bench", bench)
    with autotuning() as tuned:
        for tuner, configs in ((_Tuner(_kernel_a), 3), (_Tuner(_kernel_b), 1)):
            for config in range(configs):
                assert Autotuner._bench(tuner, config=config) == [1.0]
    assert Autotuner._bench is bench
    assert sorted(tuned) == ["_kernel_a", "_kernel_b"]
    assert tuned["_kernel_a"][1] == 3 and tuned["_kernel_b"][1] == 1
    assert tuned["_kernel_a"][0] >= 0.03 and tuned["_kernel_b"][0] >= 0.01
