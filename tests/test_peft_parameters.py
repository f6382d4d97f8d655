"""PEFT's LoRA on parameters (MoE experts, routers) traces into one graph under the backend."""

import peft
import pytest
import torch

import lecompile
from lecompile import peft_parameters

from models import batch, mixtral_with_lora_on_experts, needs_fp32_moe_compile, train_step


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # PEFT: patterns that match no module of this tiny model
@needs_fp32_moe_compile
def test_lora_on_mixtral_experts_compiles_as_one_graph_and_trains_exactly():
    model = mixtral_with_lora_on_experts()
    assert sum(isinstance(m, peft.tuners.lora.layer.ParamWrapper) for m in model.modules()) == 6
    eager_loss, eager_grads = train_step(model, model, batch())

    torch._dynamo.reset()
    backend = lecompile.longexposure(lecompile.LongExposureConfig())
    loss, grads = train_step(torch.compile(model, backend=backend), model, batch())

    assert len(backend.reports) == 1  # PEFT's parametrization alone breaks it into about 20 graphs
    torch.testing.assert_close(loss, eager_loss, atol=2e-5, rtol=1e-4)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=2e-5, rtol=1e-4, msg=name)
    assert peft_parameters.TRACED.format(n=6) in backend.report.notes


def test_made_traceable_once():
    peft_parameters.make_traceable()
    forward = peft.tuners.lora.layer.ParamWrapper.forward
    peft_parameters.make_traceable()
    assert peft.tuners.lora.layer.ParamWrapper.forward is forward
    assert not getattr(forward.__wrapped__, "_lecompile_traceable", False)
