"""DDP and FSDP2 (``fully_shard``) with the backend: two CPU processes over gloo.

Each rank compiles its own model and predicts for its own half of the batch, so rank ``r``'s
loss equals a single-process compiled step on that half, and the synchronized gradients equal
the mean of the two single-process gradients (no cross-rank state in the predictors or ops).
"""

import faulthandler
import logging
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lecompile
from lecompile import LongExposureConfig, ddp

from models import LAYERS, batch, tiny_model, train_step

pytestmark = pytest.mark.slow  # whole models compiled many times: the second test command

CONFIG = dict(mlp_density=0.5, k_align=64, predictor="oracle")
WORLD = 2
#: seconds a rank may take; a stuck collective fails the test instead of hanging the suite
RANK_TIMEOUT = 300


def rank_batch(rank):
    ids = batch()["input_ids"]
    return {"input_ids": ids[rank::WORLD], "labels": ids[rank::WORLD], "use_cache": False}


def _worker(rank, port, wrapper, out_dir):
    # Each rank's output goes to a log the test shows if the rank fails.
    log = open(os.path.join(out_dir, f"{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # A rank stuck anywhere prints every thread's stack to its log and exits before the test stops
    # waiting: the failure says where it was stuck.
    faulthandler.dump_traceback_later(2 * RANK_TIMEOUT - 30, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One thread and no compile workers per rank: two ranks share a small CI machine's cores.
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=RANK_TIMEOUT))
    model = tiny_model("llama", "lora")
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    backend = lecompile.longexposure(LongExposureConfig.create(**CONFIG))
    loss = torch.compile(wrapped, backend=backend)(**rank_batch(rank)).loss
    loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    report = backend.report
    torch.save((loss.item(), report.mlp_rewritten, str(report).splitlines()[0], grads),
               os.path.join(out_dir, f"{rank}.pt"))
    # The ranks tear down together (a rank that leaves while the other still works can hang it),
    # and only after success: destroying a group that another rank still uses can deadlock.
    dist.barrier()
    dist.destroy_process_group()


def _tail(path, chars=3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_ranks_match_single_process_halves(wrapper, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, wrapper, str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 2 * RANK_TIMEOUT
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # one rank failed: the other would wait for it
        time.sleep(0.5)
    codes = [p.exitcode for p in procs]
    for p in procs:  # never leave a rank behind: pytest would wait for it at exit
        if p.is_alive():
            p.kill()
            p.join()
    if codes != [0] * WORLD:
        logs = "\n".join(f"--- rank {r} (exit code {c}) ---\n" + _tail(tmp_path / f"{r}.log")
                         for r, c in enumerate(codes))
        pytest.fail(f"a rank failed or ran past {2 * RANK_TIMEOUT} s (exit codes {codes}; None: still "
                    f"running when stopped)\n{logs}")
    got = {r: torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)}

    singles = []
    for rank in range(WORLD):
        torch._dynamo.reset()
        model = tiny_model("llama", "lora")
        backend = lecompile.longexposure(LongExposureConfig.create(**CONFIG))
        singles.append(train_step(torch.compile(model, backend=backend), model, rank_batch(rank)))
    for rank in range(WORLD):
        loss, rewritten, header, grads = got[rank]
        assert rewritten == LAYERS, f"rank {rank} rewrote {rewritten} MLPs"
        assert header.startswith(f"lecompile report (rank {rank} of {WORLD}):"), header
        torch.testing.assert_close(torch.tensor(loss), singles[rank][0], atol=2e-5, rtol=1e-4)
        for name, g in grads.items():
            mean = (singles[0][1][name] + singles[1][1][name]) / WORLD
            torch.testing.assert_close(g, mean, atol=2e-5, rtol=1e-4, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("optimize_ddp", [None, True])
def test_ddp_models_compile_whole_unless_splitting_is_turned_back_on(optimize_ddp, caplog):
    """Tiny gradient buckets make Dynamo's DDP optimizer cut every MLP block. Importing lecompile
    turned the splitting off: every MLP is rewritten and the report says the graph is whole.
    Turned back on, the cuts leave the MLPs dense, and the report and the logger say why."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.nn.parallel import DistributedDataParallel

    caplog.set_level(logging.INFO, logger="lecompile")
    settings = {} if optimize_ddp is None else {"optimize_ddp": optimize_ddp}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(**settings), pytest.MonkeyPatch.context() as patch:
            patch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1000)  # DDP's first bucket <= the others
            model = DistributedDataParallel(tiny_model("llama", "lora"), bucket_cap_mb=0.005)
            backend = lecompile.longexposure(LongExposureConfig.create(**CONFIG))
            torch.compile(model, backend=backend)(**batch()).loss.backward()
    finally:
        dist.destroy_process_group()
    report = backend.report
    if optimize_ddp is None:
        assert report.mlp_rewritten == LAYERS and not report.unmatched
        assert ddp.WHOLE in report.notes and ddp.WHOLE in caplog.text
    else:
        assert report.mlp_rewritten == 0 and ddp.WHOLE not in report.notes
        assert any("set it to False" in u.reason for u in report.unmatched)
        assert "set it to False" in caplog.text
