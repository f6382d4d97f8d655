"""``--variant-timeout``: each variant runs in a process of its own, killed with everything it
started when it runs too long; the row records why, and the next variant runs."""

import argparse
import os
import time

import pytest
from process_helpers import run_out_of_memory, start_a_child_then_hang

from benchmarks import e2e
from benchmarks.own_process import ProcessFailed, ProcessTimeout, in_own_process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_variant_past_its_time_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "grandchild"
    start = time.perf_counter()
    with pytest.raises(ProcessTimeout, match="--variant-timeout 4 s"):
        in_own_process(start_a_child_then_hang, (str(pid_file),), timeout=4, what="--variant-timeout")
    assert time.perf_counter() - start < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:  # the kernel reaps it a moment later
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_a_variants_process_returns_its_result_or_its_error():
    assert in_own_process(divmod, (7, 2), timeout=60) == (3, 1)
    with pytest.raises(ProcessFailed) as failed:
        in_own_process(run_out_of_memory, (), timeout=60)
    assert failed.value.out_of_memory and repr(failed.value).startswith("OutOfMemoryError('CUDA out of memory.")


def test_run_case_records_a_timed_out_or_failed_variant_and_runs_the_next(monkeypatch):
    outcomes = {"eager": ProcessTimeout("still running after --variant-timeout 5 s"),
                "inductor": ProcessFailed("OutOfMemoryError('CUDA out of memory.')", out_of_memory=True)}

    def in_own_process(fn, args, timeout, what):
        assert fn is e2e._run_variant_with and timeout == 5 and what == "--variant-timeout"
        variant = args[2]
        if variant.name in outcomes:
            raise outcomes[variant.name]
        return dict(ms=1.0, compile_s=0.0, loss_step1=1.0, peak_mem_gib=0.0, extra={})

    monkeypatch.setattr(e2e, "in_own_process", in_own_process)
    chosen = [v for v in e2e.variants(densities=(1.0,)) if v.name in ("eager", "inductor", "lecompile-d1")]
    stuck, oom, after = e2e.run_case(e2e.Case("tiny-llama", "lora", 2, 32), chosen, "cpu", variant_timeout=5)
    assert stuck["timed_out"] is True and "--variant-timeout 5 s" in stuck["error"] and "ms" not in stuck
    assert oom["out_of_memory"] is True and oom["error"].startswith("OutOfMemoryError(")
    assert after["ms"] == 1.0 and "error" not in after


def test_a_time_limit_must_be_positive():
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    with pytest.raises(ValueError, match="--variant-timeout must be > 0 seconds, got 0.0"):
        e2e.run(parser.parse_args(["--variant-timeout", "0"]))
