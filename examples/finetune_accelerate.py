"""LoRA fine-tuning with ``accelerate`` and the longexposure backend, on one or more processes.

    accelerate launch examples/finetune_accelerate.py            # the config's processes
    accelerate launch --num_processes 2 examples/finetune_accelerate.py

accelerate's own ``dynamo_backend`` accepts a fixed list of names; leave it at ``no`` and
compile the model before ``prepare`` as below. Each process predicts for its own batch.
"""

import argparse

import peft
import torch
from accelerate import Accelerator

import lecompile
from examples.data import batches, load_model, token_splits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mlp-density", type=float, default=0.5)
    args = parser.parse_args()

    accelerator = Accelerator()
    model, tokenizer = load_model(dtype=torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
    backend = lecompile.longexposure(lecompile.LongExposureConfig(mlp_density=args.mlp_density))
    model.compile(backend=backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model, optimizer = accelerator.prepare(model, optimizer)

    rows = token_splits(tokenizer, args.seq_len)["train"]
    for step, ids in enumerate(batches(rows, args.batch_size, args.steps, seed=accelerator.process_index)):
        ids = ids.to(accelerator.device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0:
            accelerator.print(f"step {step}: loss {loss.item():.3f}")
    accelerator.print(backend.report)


if __name__ == "__main__":
    main()
