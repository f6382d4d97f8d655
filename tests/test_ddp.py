"""Dynamo's DDP graph splitting is turned off by importing the backend, at its default only
(whole-model DDP runs are in test_distributed.py)."""

import subprocess
import sys

import pytest
import torch

from lecompile import ddp


@pytest.mark.parametrize("before, after", [(True, False), ("ddp_optimizer", "ddp_optimizer"), (False, False),
                                           ("python_reducer", "python_reducer")])
def test_only_the_default_is_turned_off(before, after):
    with torch._dynamo.config.patch(optimize_ddp=before):
        ddp.turn_off_graph_splitting()
        assert torch._dynamo.config.optimize_ddp == after


def test_compiling_with_the_backend_by_name_turns_it_off_before_the_first_frame():
    script = ("import torch\n"
              "assert torch._dynamo.config.optimize_ddp is True\n"
              "torch.compile(torch.nn.Linear(2, 2), backend='longexposure')\n"
              "print(torch._dynamo.config.optimize_ddp)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_outside_ddp_nothing_is_whole_or_split():
    assert not ddp.compiled_whole() and not ddp.splits_graphs()
