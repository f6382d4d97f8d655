import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    torch._dynamo.reset()
    yield
