"""Hugging Face Trainer with a PEFT model compiled by the backend (the path docs/training-stacks.md
documents): trains, evaluates, generates, and saves checkpoints with no lecompile state."""

import pytest
import torch
from torch._dynamo.utils import counters

import lecompile  # noqa: F401  (the backend is registered by the entry point too)

from models import LAYERS, VOCAB, tiny_model

pytestmark = pytest.mark.slow  # whole models compiled many times: the second test command

transformers = pytest.importorskip("transformers")


class RandomText(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=64):
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (self.seq,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def test_trainer_trains_evaluates_generates_and_checkpoints(tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("LECOMPILE_MLP_DENSITY", "0.5")
    monkeypatch.setenv("LECOMPILE_K_ALIGN", "64")
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama", "lora")
    model.compile(backend="longexposure")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=3,
        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, learning_rate=1e-3)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomText(), eval_dataset=RandomText(4))
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert counters["lecompile"]["sparse_mlp"] >= LAYERS, "the backend rewrote nothing under Trainer"
    assert counters["lecompile"]["sparse_mlp_calls"] > 0

    metrics = trainer.evaluate()  # eval mode, no grad: inference graphs stay dense
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    model.eval()
    prompt = torch.randint(0, VOCAB, (1, 8))
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)

    state = model.state_dict()
    assert not any("lecompile" in k or "_orig_mod" in k for k in state), "lecompile state in the state dict"
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_model("llama", "plain"), checkpoint)  # same seed: same base
    trained = {k: v for k, v in model.named_parameters() if "lora_" in k}
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, trained[name], msg=name)

