"""Tiny random Hugging Face models with PEFT adapters, and a train-step helper, for the tests."""

from __future__ import annotations

import inspect

import peft
import pytest
import torch
import transformers.integrations.moe  # noqa: F401  (registers transformers' grouped_mm ops)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.opt.modeling_opt import OPTDecoder

VOCAB, HIDDEN, FFN, LAYERS, HEADS = 128, 64, 256, 2, 4
BATCH, SEQ = 2, 16
MAX_POSITIONS = 256

#: Under torch.compile transformers runs fp32 experts through its ``grouped_mm_fallback`` op, whose
#: backward called ``offs.tolist()`` (which no backend can trace, Inductor neither) until it became an
#: op of its own: transformers 5.17 lacks it, 5.25 has it.
FP32_MOE_COMPILES = hasattr(torch.ops.transformers, "grouped_mm_fallback_backward")
needs_fp32_moe_compile = pytest.mark.skipif(
    not FP32_MOE_COMPILES,
    reason="this transformers cannot compile fp32 MoE experts (its grouped_mm fallback's backward calls tolist())")

#: OPT's decoder in training drew LayerDrop's random number even at ``layerdrop=0`` (transformers 5.17;
#: 5.25 draws only when ``layerdrop > 0``), and Dynamo breaks the forward at that branch: each decoder
#: layer becomes a graph of its own, the final norm runs eagerly and the loss sits in another graph.
OPT_ONE_GRAPH = "self.layerdrop > 0" in inspect.getsource(OPTDecoder.forward)
needs_opt_one_graph = pytest.mark.skipif(
    not OPT_ONE_GRAPH, reason="this transformers' OPT breaks the training graph at every layer (LayerDrop)")

# (builder, LoRA targets, IA3 targets, IA3 feed-forward targets)
ARCHS = {
    "opt": (lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=HIDDEN,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)),
        ["q_proj", "v_proj", "fc1", "fc2"], ["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        ["c_attn", "c_fc", "c_proj"], ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, mlp_bias=True)),
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"],
        ["down_proj"]),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS)),
        ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], ["k_proj", "v_proj", "down_proj"],
        ["down_proj"]),
}
METHODS = ("plain", "lora", "ia3", "bias")


def tiny_model(arch: str, method: str, seed: int = 0, dtype=torch.float32, rank: int = 4) -> torch.nn.Module:
    """A 2-layer ``arch`` model, train mode, with ``method`` adapters (``plain``: full fine-tuning;
    LoRA of rank ``rank``)."""
    torch.manual_seed(seed)
    build, lora_targets, ia3_targets, ia3_ff = ARCHS[arch]
    model = build().to(dtype)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets,
                                                           lora_dropout=0.0, init_lora_weights=False))
    elif method == "ia3":
        model = peft.get_peft_model(model, peft.IA3Config(target_modules=ia3_targets,
                                                          feedforward_modules=ia3_ff,
                                                          init_ia3_weights=False))
    elif method == "bias":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
        if not any(p.requires_grad for p in model.parameters()):  # no biases: train the norms
            for name, p in model.named_parameters():
                p.requires_grad_("norm" in name)
    return model.train()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def train_step(model, params_of, inputs):
    """Loss and gradients (by parameter name) of one forward + backward of ``model``."""
    for p in params_of.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters() if p.grad is not None}


def dynamo_graphs(fn, *args, **kwargs) -> list:
    """The graphs Dynamo hands a backend for ``fn(*args, **kwargs)``, each as ``(gm, example_inputs)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture)(*args, **kwargs)
    return graphs


def mixtral_with_lora_on_experts(seed: int = 0) -> torch.nn.Module:
    """Tiny Mixtral with LoRA on ``all-linear``, which PEFT also applies to the stacked experts'
    weights and the router's weight (``ParamWrapper``: 6 of them in 2 layers)."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN // 2, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=MAX_POSITIONS))
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear",
                                                      init_lora_weights=False)).train()


def gpt_oss_with_lora_on_experts(seed: int = 0) -> torch.nn.Module:
    """Tiny GPT-OSS (attention sinks; experts with biases, stored ``[experts, in, out]``, and a
    clamped sigmoid-gated activation) with LoRA on q/v and, by ``target_parameters``, the experts."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HIDDEN // HEADS, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=MAX_POSITIONS))
    return peft.get_peft_model(model, peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])).train()
