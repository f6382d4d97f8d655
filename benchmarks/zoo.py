"""The model zoo: every decoder architecture lecompile is tried on, tiny and random, on the CPU.

    python -m benchmarks.zoo            # run, print, and write the zoo table of docs/supported.md
    python -m benchmarks.zoo --check    # exit 1 if that table is out of date (the slow tests run this)

Per architecture and adapters (LoRA r=4 on every linear, or none: full fine-tuning), one train
step through ``backend=longexposure()`` at density 1.0 against the same step in eager PyTorch:
MLPs and attention blocks matched (of the decoder layers), loss and every gradient equal within
tolerance, and the graphs Dynamo compiles with the backend against a backend that changes nothing
(a graph break of our making would show as more); then, with ``lecompile.explain`` (no Inductor),
what a sparse config (MLP and attention density 0.5, 16-token attention blocks) would rewrite.
The first reason the reports give for anything left unmatched or dense there goes in the last
column.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "supported.md"
BEGIN, END = "<!-- zoo table: begin (python -m benchmarks.zoo) -->", "<!-- zoo table: end -->"
VERSION_LINE = "Measured with transformers {} and PEFT {}."  # PEFT decides what "all-linear" adapts
VOCAB, HIDDEN, FFN, LAYERS, HEADS, BATCH, SEQ = 128, 64, 256, 2, 4, 2, 16
TOL = dict(atol=2e-5, rtol=1e-4)
SPARSE = dict(mlp_density=0.5, attn_density=0.5, attn_block=SEQ)


def _configs() -> Dict[str, Callable[[], torch.nn.Module]]:
    import transformers as T
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, max_position_embeddings=256)
    kv = dict(num_key_value_heads=2)
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return {
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=256, word_embed_proj_dim=HIDDEN, dropout=0.0)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS,
                                                       n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**kv, **common)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**kv, **common)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**kv, **common)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **kv, **common)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=16, **kv, **common)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=16, **kv, **common)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=16, **kv, **common)),
        "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**kv, **common)),
        "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(**kv, **common)),
        "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**kv, **common)),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**common)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kv,
                                                       **common)),
        "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**kv, **common)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**common)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                       n_inner=FFN, rotary_dim=8)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                                             num_hidden_layers=LAYERS, num_attention_heads=HEADS)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                                          n_head=HEADS)),
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**moe, **kv, **common)),
        "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(head_dim=16, **moe, **kv, **common)),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=FFN // 2, **kv, **common)),
        "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **kv, **common)),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=FFN // 2, shared_expert_intermediate_size=FFN,
            **kv, **common)),
    }


def _model(arch: str, adapters: str) -> torch.nn.Module:
    import peft
    torch.manual_seed(0)
    model = _configs()[arch]()
    if adapters == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                           init_lora_weights=False))
    return model.train()


def _step(fn, model, inputs):
    loss = fn(**inputs).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss.detach(), list(grads)


def run_case(arch: str, adapters: str) -> dict:
    import lecompile
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    row = {"architecture": arch, "adapters": adapters}
    try:
        model = _model(arch, adapters)
    except (AttributeError, TypeError, ValueError) as err:  # an architecture this transformers lacks
        return {**row, "error": f"not built: {err}"[:120]}
    try:
        eager_loss, eager_grads = _step(model, model, inputs)
        graphs = []
        torch._dynamo.reset()
        _step(torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward), model, inputs)
        torch._dynamo.reset()
        backend = lecompile.longexposure(lecompile.LongExposureConfig())
        loss, grads = _step(torch.compile(model, backend=backend), model, inputs)
        torch._dynamo.reset()
        sparse = lecompile.explain(model, **inputs, config=lecompile.LongExposureConfig.create(**SPARSE))
    except Exception as err:  # noqa: BLE001  (the zoo reports every failure, whatever it is)
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    report = backend.report
    exact = bool(torch.allclose(loss, eager_loss, **TOL)) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, **TOL))
        for a, b in zip(grads, eager_grads))
    reasons = ([u.reason for u in report.unmatched + sparse.unmatched]
               + [e.note for e in sparse.mlp + sparse.attention if not e.rewritten])
    return {**row, "mlp": f"{len(report.mlp)}/{LAYERS}", "attention": f"{len(report.attention)}/{LAYERS}",
            "lora_fused": report.linears_fused, "exact": exact, "graphs": f"{len(backend.reports)}/{len(graphs)}",
            "sparse": f"{sparse.mlp_rewritten} / {sparse.attention_rewritten}",
            "note": (reasons[0].split(";")[0][:140] if reasons else "")}


def table(rows: List[dict]) -> str:
    lines = ["| architecture | adapters | MLPs matched | attention matched | LoRA linears fused | density 1.0 = eager "
             "| graphs (backend / Dynamo alone) | sparse at 0.5 (MLPs / attention) | first thing left unmatched or "
             "dense |", "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['architecture']} | {r['adapters']} | - | - | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {r['architecture']} | {r['adapters']} | {r['mlp']} | {r['attention']} | {r['lora_fused']} | "
                     f"{'yes' if r['exact'] else 'NO'} | {r['graphs']} | {r['sparse']} | {r['note'] or '-'} |")
    return "\n".join(lines)


def document(rows: List[dict]) -> str:
    """docs/supported.md with ``rows`` as its zoo table, under the transformers and PEFT versions that made them."""
    import peft
    import transformers
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    versions = VERSION_LINE.format(transformers.__version__, peft.__version__)
    return f"{head}{BEGIN}\n{versions}\n\n{table(rows)}\n{END}{tail}"


def documented_versions() -> Tuple[str, str]:
    """The transformers and PEFT versions docs/supported.md's zoo table was measured with."""
    after = DOC.read_text().split(BEGIN, 1)[1].lstrip("\n").splitlines()[0]
    found = re.fullmatch(re.escape(VERSION_LINE).replace(re.escape("{}"), r"(\S+)"), after)
    if found is None:
        raise ValueError(f"{DOC} names no transformers and PEFT versions at the top of its zoo table: "
                         "run python -m benchmarks.zoo")
    return found.group(1), found.group(2)


def run_all(progress: bool = True) -> List[dict]:
    cases = [(arch, adapters) for arch in _configs() for adapters in ("lora", "none")]
    return [run_case(*case) for case in tqdm(cases, desc="zoo", disable=not progress)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/supported.md is out of date")
    args = parser.parse_args(argv)
    rows = run_all()
    print(table(rows))
    new = document(rows)
    if args.check:
        if DOC.read_text() != new:
            print("docs/supported.md's zoo table is out of date: run python -m benchmarks.zoo", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
