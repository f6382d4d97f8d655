"""``--variant-timeout``: a variant that runs too long is recorded as timed out and the next one runs."""

import argparse
import time

import pytest

from benchmarks import e2e


def test_a_variant_past_its_time_is_recorded_and_the_next_runs(monkeypatch):
    def run_variant(case, variant, device, steps, warmup):
        if variant.name == "eager":
            time.sleep(30)
        return e2e.StepResult(ms=1.0, compile_s=0.0, loss_step1=1.0, peak_mem_gib=0.0)

    monkeypatch.setattr(e2e, "run_variant", run_variant)
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "lecompile-d1")]
    start = time.perf_counter()
    stuck, after = e2e.run_case(e2e.Case("tiny-llama", "lora", 2, 32), chosen, "cpu", variant_timeout=0.2)
    assert time.perf_counter() - start < 10
    assert stuck["timed_out"] is True and "--variant-timeout 0.2 s" in stuck["error"] and "ms" not in stuck
    assert after["ms"] == 1.0 and "error" not in after


def test_a_time_limit_must_be_positive():
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    with pytest.raises(ValueError, match="--variant-timeout must be > 0 seconds, got 0.0"):
        e2e.run(parser.parse_args(["--variant-timeout", "0"]))
