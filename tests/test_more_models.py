"""More Hugging Face architectures, LoRA on every linear: their MLPs are found by structure and
the sparse step matches an eager model masked to the same neurons (the full method matrix runs on
OPT, GPT-2, LLaMA and Qwen2 in test_models.py)."""

import peft
import pytest
import torch
import transformers as T

from lecompile import LongExposureConfig

from models import FFN, HEADS, HIDDEN, LAYERS, VOCAB, batch, train_step
from test_models import TOL, compiled_step, mask_mlp_intermediate

pytestmark = pytest.mark.slow  # whole models compiled many times: the second test command

COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, max_position_embeddings=256)

# name: (model builder, the MLP's output linear)
ARCHS = {
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, **COMMON)), "down_proj"),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(num_key_value_heads=2, head_dim=16, **COMMON)), "down_proj"),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON)), "dense_4h_to_h"),
    "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**COMMON)), "fc2"),
    "starcoder2": (lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(num_key_value_heads=2, **COMMON)), "c_proj"),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(num_key_value_heads=2, head_dim=16, **COMMON)), "down_proj"),
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(num_key_value_heads=2, head_dim=16, **COMMON)),
               "down_proj"),
    "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(num_key_value_heads=2, **COMMON)), "down_proj"),
    "granite": (lambda: T.GraniteForCausalLM(T.GraniteConfig(num_key_value_heads=2, **COMMON)), "down_proj"),
    "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(num_key_value_heads=2, **COMMON)), "down_proj"),
    "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                    n_inner=FFN, rotary_dim=8)), "fc_out"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_lora_step_matches_masked_eager(arch):
    build, fc2 = ARCHS[arch]
    torch.manual_seed(0)
    try:
        base = build()
    except AttributeError:  # the installed transformers predates this architecture
        pytest.skip(f"{arch} is not in transformers {T.__version__}")
    config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, config).train()
    inputs = batch()
    eager_loss, _ = train_step(model, model, inputs)
    handles = mask_mlp_intermediate(model, "mlp." + fc2, FFN // 2)
    ref_loss, ref_grads = train_step(model, model, inputs)
    for h in handles:
        h.remove()
    config = LongExposureConfig.create(mlp_density=0.5, predictor="oracle", k_align=64)
    loss, grads, report = compiled_step(model, config, inputs)
    assert report.mlp_rewritten >= 1 and all(e.rewritten for e in report.mlp), str(report)
    assert abs(ref_loss.item() - eager_loss.item()) > 1e-6, "masking had no effect: the test cannot fail"
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
