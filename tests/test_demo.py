"""The README's demo (``python -m examples.demo``) on a tiny random LLaMA: its loading of the real
model is left out (no model file in tests), its training, comparison and table are not."""

import copy
import re

import torch

from examples.demo import format_results, train
from lecompile import LongExposureBackend, LongExposureConfig

from models import LAYERS, VOCAB, tiny_model


def test_demo_trains_both_variants_alike_at_density_one_and_tabulates_them():
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, VOCAB, (2, 32), generator=gen) for _ in range(3)]
    start, cpu = tiny_model("llama", "lora"), torch.device("cpu")
    results = []
    for variant, backend in (("dense (eager)", None), ("lecompile", LongExposureBackend(LongExposureConfig()))):
        torch._dynamo.reset()
        results.append(train(copy.deepcopy(start), variant, backend, ids, ids[:1], cpu, lr=1e-3))
    dense, compiled = results
    torch.testing.assert_close(compiled.losses, dense.losses, rtol=1e-4, atol=1e-5)
    assert dense.losses[-1] < dense.losses[0]  # it trains
    assert abs(compiled.heldout_loss - dense.heldout_loss) < 1e-4
    table = format_results(results)
    assert "1.0 (exact)" in table and f"{LAYERS} MLP (0 sparse), {LAYERS} attention" in table, table
    assert re.search(r", [1-9][0-9]* LoRA linears fused", table), table
