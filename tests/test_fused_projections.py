"""Fused projections (Phi-3's ``gate_up_proj``, one linear split by ``chunk``): the MLP is
matched, exact at density 1.0, and at density 0.5 equals the masked dense reference, LoRA on the
fused linear included."""

import peft
import torch
from torch._dynamo.utils import counters
from transformers import Phi3Config, Phi3ForCausalLM

import lecompile
from lecompile import LongExposureConfig

from models import FFN, HEADS, HIDDEN, LAYERS, VOCAB, batch, train_step
from test_models import TOL, compiled_step, mask_mlp_intermediate


def tiny_phi3(method):
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2))
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                           target_modules=["qkv_proj", "gate_up_proj", "down_proj"]))
    return model.train()


def test_phi3_fused_gate_up_is_matched_and_exact_then_sparse_as_the_masked_reference():
    model, inputs = tiny_phi3("lora"), batch()
    eager_loss, eager_grads = train_step(model, model, inputs)
    loss, grads, report = compiled_step(model, LongExposureConfig(mlp_density=1.0), inputs)
    assert len(report.mlp) == LAYERS and {e.pattern for e in report.mlp} == {"silu_gated"}, str(report)
    assert all("gate:lora" in e.peft and "up:lora" in e.peft for e in report.mlp), str(report)
    torch.testing.assert_close(loss, eager_loss, **TOL)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOL, msg=name)

    handles = mask_mlp_intermediate(model, "down_proj", FFN // 2)
    ref_loss, ref_grads = train_step(model, model, inputs)
    for h in handles:
        h.remove()
    loss, grads, report = compiled_step(
        model, LongExposureConfig.create(mlp_density=0.5, predictor="oracle", k_align=64), inputs)
    assert report.mlp_rewritten == LAYERS and counters["lecompile"]["sparse_mlp_calls"] == LAYERS, str(report)
    assert abs(loss.item() - eager_loss.item()) > 1e-6, "masking had no effect: the test cannot fail"
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # the fused linear's LoRA B gets both halves' gradients
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def test_phi3_with_the_svd_predictor_trains_a_few_sparse_steps():
    model = tiny_phi3("lora")
    torch._dynamo.reset()
    backend = lecompile.longexposure(LongExposureConfig.create(mlp_density=0.5, k_align=64))
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = compiled(**batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    assert backend.report.mlp_rewritten == LAYERS
    assert not any(e.fused for e in backend.report.linears if "gate_up_proj" in e.layer)  # went with the MLP
