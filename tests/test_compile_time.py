"""The compile-time benchmark (``python -m benchmarks.compile_time``) on a tiny model on the CPU."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import compile_time


@pytest.mark.slow
def test_a_warm_process_hits_every_cache_and_trains_the_same(tmp_path):
    rows = compile_time.run(["tiny-llama"], ["lecompile-d0.5"], ["2x64"], None, "cpu", tmp_path, timeout=600)["rows"]
    (row,) = rows
    assert "error" not in row, row["error"]
    assert row["cold_phases"]["lecompile_passes"] > 0 and row["cold_phases"]["inductor"] > 0
    assert row["warm_caches"] == {"autograd_cache_hit": 1, "autograd_cache_miss": 0,
                                  "fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0}, row["warm_caches"]
    assert row["warm_phases"]["inductor"] == 0 and row["warm_s"] < row["cold_s"]
    assert row["warm_loss_step1"] == row["cold_loss_step1"]
    assert (tmp_path / "compile_time.json").exists() and (tmp_path / "compile_time.png").stat().st_size > 0


def test_ratios_compare_rows_of_one_case():
    rows = [dict(model="m", layers=None, shape="8x512", variant=v, cold_s=s)
            for v, s in (("inductor", 10.0), ("inductor-bf16-adapters-cg", 20.0), ("inductor-bf16-adapters", 8.0),
                         ("lecompile-d1", 12.0))]
    rows.append(dict(model="m", layers=2, shape="8x512", variant="lecompile-d1", cold_s=5.0))
    compile_time.add_ratios(rows)
    assert rows[3]["cold_vs_inductor"] == 1.2 and rows[3]["cold_vs_strongest"] == 0.6
    assert "cold_vs_inductor" not in rows[4]  # another case: no baseline of its own
    # without CUDA graphs (long sequences), the strongest setup is Inductor with bf16 adapters
    long = [dict(model="m", layers=None, shape="1x16384", variant=v, cold_s=s)
            for v, s in (("inductor-bf16-adapters", 20.0), ("lecompile-d1-a0.5", 30.0))]
    compile_time.add_ratios(long)
    assert long[1]["cold_vs_strongest"] == 1.5


@pytest.mark.parametrize("shape", ["8", "8x", "0x512", "8x512x2", "ax512"])
def test_bad_shapes_are_named(shape):
    with pytest.raises(ValueError, match=repr(shape)):
        compile_time.parse_shape(shape)


@pytest.mark.parametrize("name, mlp, attention, mask_blocks, cudagraphs", [
    ("lecompile-d0.25-cg", 0.25, 1.0, False, True), ("lecompile-d1-a0.5", 1.0, 0.5, False, False),
    ("lecompile-d0.25-a0.5-cg", 0.25, 0.5, False, True), ("lecompile-d1-mask-blocks", 1.0, 1.0, True, False)])
def test_variants_are_looked_up_by_their_benchmark_names(name, mlp, attention, mask_blocks, cudagraphs):
    config = compile_time.lookup_variant(name).config
    assert (config.mlp_density, config.attn_density, config.tuning.attn_mask_blocks, config.cudagraphs) == (
        mlp, attention, mask_blocks, cudagraphs)
    assert compile_time.lookup_variant("inductor-bf16-adapters-cg").config is None


def test_settings_reach_lecompile_variants_and_bad_ones_are_named():
    config = compile_time.lookup_variant("lecompile-d1-cg", ["lora_in_gemm=false", "k_align=64"]).config
    assert (config.tuning.lora_in_gemm, config.tuning.k_align, config.cudagraphs) == (False, 64, True)
    assert compile_time.lookup_variant("inductor", ["lora_in_gemm=false"]).config is None
    with pytest.raises(ValueError, match="lora_in_gem="):
        compile_time.lookup_variant("lecompile-d1", ["lora_in_gem=false"])
    with pytest.raises(ValueError, match="mlp_density"):  # set by the variant's name
        compile_time.lookup_variant("lecompile-d1", ["mlp_density=0.5"])


def test_ratios_keep_checkpointed_and_layer_broken_cases_apart():
    rows = [dict(model="m", layers=2, shape="1x4096", variant=v, cold_s=s, checkpointing=c, layer_breaks=b)
            for v, s, c, b in (("inductor", 10.0, False, False), ("lecompile-d1-a0.5", 30.0, True, False),
                               ("inductor", 20.0, True, False), ("inductor", 5.0, True, True),
                               ("lecompile-d1-a0.5", 6.0, True, True))]
    compile_time.add_ratios(rows)
    assert rows[1]["cold_vs_inductor"] == 1.5
    assert rows[4]["cold_vs_inductor"] == 1.2


def test_unknown_variants_are_refused_before_measuring(capsys):
    with pytest.raises(SystemExit):
        compile_time.main(["--variants", "lecompile-dfast"])
    assert "unknown variant 'lecompile-dfast'" in capsys.readouterr().err


def test_plot_leaves_out_rows_whose_warm_process_did_not_run(tmp_path):
    phases = dict.fromkeys([*compile_time.PHASES, "autotune"], 1.0)
    done = dict(model="m", layers=None, shape="8x512", variant="inductor", cold_s=9.0, warm_s=2.0, cold_phases=phases)
    failed = dict(done, variant="lecompile-d1", error="warm process failed")
    del failed["warm_s"]
    compile_time.plot([done, failed], tmp_path / "compile_time.png")
    assert (tmp_path / "compile_time.png").stat().st_size > 0


def test_a_process_past_its_timeout_is_killed_with_the_workers_it_started(tmp_path):
    pid_file = tmp_path / "worker.pid"
    starts_a_worker = (f"import subprocess, sys, time\n"
                       f"w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                       f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
                       f"time.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        compile_time.run_process([sys.executable, "-c", starts_a_worker], dict(os.environ), timeout=5)
    worker = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(100):  # the kill lands at once, its effect shows a moment later
        if not worker.exists() or worker.read_text().rsplit(")", 1)[1].split()[0] == "Z":  # gone, or a zombie
            return
        time.sleep(0.05)
    pytest.fail(f"the worker ({worker}) outlived the timed-out process")


def test_a_process_that_ends_returns_its_output():
    code, out, err = compile_time.run_process([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"],
                                              dict(os.environ), timeout=60)
    assert (code, out.strip(), err) == (3, "out", "")


def test_a_process_past_its_timeout_leaves_its_last_stack_dump():
    hangs = ("import faulthandler, time\n"
             "faulthandler.dump_traceback_later(0.5, repeat=True)\n"
             "def compiling_a_kernel():\n"
             "    time.sleep(60)\n"
             "compiling_a_kernel()\n")
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        compile_time.run_process([sys.executable, "-c", hangs], dict(os.environ), timeout=3)
    stacks = compile_time.last_stacks(expired.value.stderr)
    assert stacks.startswith("Timeout (") and "compiling_a_kernel" in stacks
    assert stacks.count("Timeout (") == 1  # the last dump only
    assert compile_time.last_stacks("no dump here") == ""


def test_negative_stack_intervals_are_refused(capsys):
    with pytest.raises(SystemExit):
        compile_time.main(["--stacks", "-1"])
    assert "--stacks must be >= 0 seconds, got -1" in capsys.readouterr().err
