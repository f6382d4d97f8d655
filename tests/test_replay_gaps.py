"""The CUDA-graph step's timeline (``benchmarks/replay_gaps.py``; it runs on a GPU, so the kernels
here are made up, with the profiler's field names)."""

from types import SimpleNamespace

import pytest

from benchmarks import e2e, replay_gaps


def event(name, start_us, end_us, activity="kernel", device="CUDA"):
    return SimpleNamespace(name=lambda: name, start_ns=lambda: start_us * 1e3, end_ns=lambda: end_us * 1e3,
                           activity_type=lambda: activity, device_type=lambda: SimpleNamespace(name=device))


def test_timeline_splits_busy_time_from_gaps():
    # the host calls at 0; kernels at 10-20 and 15-30 overlap, then gaps of 1, 50 and 300 us
    spans = [(10, 20, "a"), (15, 30, "b"), (31, 40, "c"), (90, 100, "d"), (400, 401, "e")]
    line = replay_gaps.timeline(0, spans)
    assert line["kernels"] == 5
    assert line["kernels_ms"] == pytest.approx(0.045)
    assert line["busy_ms"] == pytest.approx(0.040)
    assert line["head_ms"] == pytest.approx(0.010)
    assert line["gap_ms"] == pytest.approx(0.351)
    assert line["gaps"] == {"0-2 us": [1, 0.001], "2-5 us": [0, 0.0], "5-20 us": [0, 0.0], "20-100 us": [1, 0.05],
                            ">=100 us": [1, 0.3]}
    assert line["top_gaps"][0] == dict(us=300.0, before="d", after="e")
    assert line["top_gaps"][2] == dict(us=1.0, before="b", after="c")  # b ends last of the overlapping pair


def test_a_step_without_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernel ran"):
        replay_gaps.timeline(0, [])


def test_kernels_go_to_the_step_that_launched_them():
    events = [event(replay_gaps.STEP_MARK, 0, 100, "user_annotation", "CPU"),
              event(replay_gaps.STEP_MARK, 0, 100, "gpu_user_annotation"),  # the mark's GPU twin is no kernel
              event(replay_gaps.STEP_MARK, 200, 300, "user_annotation", "CPU"),
              event("gemm", 10, 50), event("copy", 60, 70, "gpu_memcpy"), event("aten::mm", 5, 8, "cpu_op", "CPU"),
              event("norm", 210, 240)]
    steps = replay_gaps.steps_of(events)
    assert steps == [(0, [(10, 50, "gemm"), (60, 70, "copy")]), (200, [(210, 240, "norm")])]


def test_refuses_a_variant_without_cuda_graphs():
    variant = next(v for v in e2e.variants(densities=(1.0,), baselines=False) if v.name == "lecompile-d1")
    with pytest.raises(ValueError, match="CUDA-graph variant on a CUDA device, not 'lecompile-d1'"):
        replay_gaps.profile_variant(e2e.Case("tiny-llama", "lora", 2, 32), variant, "cuda")


def test_bad_layers_are_named(tmp_path):
    with pytest.raises(ValueError, match="--layers must be >= 1, got 0"):
        replay_gaps.main(["--layers", "0", "--out", str(tmp_path)])


def test_main_profiles_each_chosen_variant(monkeypatch, tmp_path):
    profiled = []
    monkeypatch.setattr(replay_gaps, "profile_variant", lambda case, variant, device, steps: profiled.append(
        (case.name, variant.name)) or dict(case=case.name, variant=variant.name))
    replay_gaps.main(["--models", "tiny-llama", "--layers", "1", "--out", str(tmp_path)])
    assert [v for _, v in profiled] == list(replay_gaps.VARIANTS)
    assert (tmp_path / "replay_gaps.json").exists()


def test_events_without_an_activity_type_are_told_apart_by_device():
    # PyTorch 2.11's profiler events: no activity_type; GPU ranges are user annotations there
    def old(name, start_us, end_us, device="CUDA", annotation=False):
        return SimpleNamespace(name=lambda: name, start_ns=lambda: start_us * 1e3, end_ns=lambda: end_us * 1e3,
                               device_type=lambda: SimpleNamespace(name=device), is_user_annotation=lambda: annotation)
    events = [old(replay_gaps.STEP_MARK, 0, 100, "CPU", True), old(replay_gaps.STEP_MARK, 0, 100, annotation=True),
              old("gemm", 10, 50), old("aten::mm", 5, 8, "CPU")]
    assert replay_gaps.steps_of(events) == [(0, [(10, 50, "gemm")])]
