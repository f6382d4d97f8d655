import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter on machines without a GPU (set before the
    # kernels are defined: lecompile.kernels is only imported by the tests that need it).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    torch._dynamo.reset()
    yield
