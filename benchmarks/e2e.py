"""End-to-end PEFT training steps: lecompile against what users run today.

    python -m benchmarks.e2e --models opt-1.3b llama-3.2-1b --densities 1.0 --cudagraphs


Every case (model x PEFT method x batch shape) is timed for each variant in one process, on
a random-init bf16 model built from its config (weights identical across variants: same seed):

- ``eager`` / ``inductor``: PEFT's defaults (fp32 adapters, TF32 off), eager and ``torch.compile``;
- ``*-tf32`` / ``*-bf16-adapters``: the strongest user-side settings (TF32 matmuls on, or
  ``autocast_adapter_dtype=False``);
- ``lecompile-d<density>``: the ``longexposure`` backend at that MLP density (1.0 is the
  overhead check: adapter fusion only); ``-a<density>`` adds block-sparse attention at that
  attention density; ``-flash`` (``--attn-kernels flash``): that attention on FlashAttention 4's
  kernels (``attn_kernel="flash"``), a variant of its own beside the Triton kernels';
  ``-mask-blocks`` (``--mask-blocks``): attention density 1.0 with ``attn_mask_blocks`` (the
  model's masked SDPA as exact block attention), beside the same density without it;
- ``-without-<pass>`` (``--without``): a lecompile variant with that pass turned off (its
  ``speedup_vs_d1`` is what the pass buys at density 1.0);
- ``-cg`` suffix (``--cudagraphs``): the same replayed as CUDA graphs (Inductor's
  ``mode="reduce-overhead"``, lecompile's ``cudagraphs=True``);
- ``lecompile-<setting>`` (``--quality-settings``): the backend configured as that setting of the
  quality harness (:func:`benchmarks.quality.settings`, e.g. ``schedule-learned-0.5``, or
  ``attn-0.5`` of its long-context task), with the ``total_steps`` its quality was measured at; its
  dense warm-up runs before the timed steps, which cover one ``calibrate_every`` period where a
  predictor is refreshed (``mean_ms`` counts it), and the row carries ``heldout_delta`` from
  ``quality.json`` (``quality_recall.json``) and ``schedule_ms``, the mean step over the whole
  schedule (warm-up steps at their measured time);
- ``sparselora-d<density>``: SparseLoRA's way of running sparse MLPs (SVD-scored neurons per
  batch, base weights sliced every step, dense eager matmuls: :mod:`benchmarks.sparselora`) at
  each lecompile density below 1.

PEFT methods: LoRA r=16 on all linear layers (``lora``) or on the attention's query and value
projections (``lora-qv``), IA3 (PEFT's defaults), a bottleneck adapter after every MLP
(``adapter``, :class:`BottleneckAdapter`), BitFit (``bitfit``: biases only), and ``norms``
(only the normalization layers train: the base model's forward and full backward at almost no
adapter cost; with ``lora`` in the same run each LoRA row gets ``adapter_share``, the share of
its step the adapters add). On MoE models (``mixtral-*``) PEFT's ``all-linear`` LoRA also adapts
the stacked experts; since every variant runs in a process that imported lecompile, the Inductor
baselines compile them as one graph too (:mod:`lecompile.peft_parameters`), but form ``W + B·A``
as PEFT does, where lecompile runs the adapters on each expert's tokens.

A step is forward + backward + AdamW. Rows carry the median step time (and the mean,
``mean_ms``, which counts calibration steps) over ``steps`` timed steps (after compilation and
warm-up), tokens/s, peak memory, compile time (the first step; the strongest baseline's beside
it; ``autotune_s`` of it went to Triton's autotuner, ``autotune`` per kernel: seconds, configs
timed and the config each key chose) and the loss of step 1, checked against eager's at density 1.0; other
lecompile rows carry ``speedup_vs_d1`` and ``mem_vs_d1``, against density 1.0 replayed the same way (with CUDA
graphs, ``mem_vs_d1`` compares the memory reserved: their pools escape the allocator's peak). On a GPU in
:data:`GEMM_TFLOPS` they carry the step's physical limit too (:func:`limit_ms`) and
``limit_ratio`` = limit / step time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from benchmarks.common import RESULTS, autotune_record, autotune_seconds, autotuning, command_line, meta, write_results
from benchmarks.own_process import ProcessFailed, ProcessTimeout, in_own_process
from benchmarks.sparselora import SlicedOutput, mlp_blocks, replace, sparsify_mlps
from lecompile import LongExposureBackend, LongExposureConfig, compile_layers_once
from lecompile.config import ATTN_KERNELS
from lecompile.passes import OPTIONAL_PASSES
from lecompile.predictors import PREDICTORS

log = logging.getLogger(__name__)

#: Loss at step 1 of a density-1.0 variant may differ from eager's by this much (relative, bf16).
LOSS_RTOL = 2e-2
#: Dense bf16 GEMM rate (TFLOP/s) reached on each GPU, by a word of its name.
GEMM_TFLOPS = {"H200": 790.0, "H100": 790.0}


def _opt(hidden, ffn, layers, heads, proj=None, **kw):
    from transformers import OPTConfig
    return OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                     word_embed_proj_dim=proj or hidden, max_position_embeddings=2048, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, **kw)


def _gpt2(hidden, layers, heads, **kw):
    from transformers import GPT2Config
    return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def _llama(hidden, ffn, layers, heads, kv_heads, vocab=128256, config="LlamaConfig", **kw):
    """A LLaMA-shaped config (``config``: the transformers class, e.g. ``Qwen2Config``)."""
    import transformers
    return getattr(transformers, config)(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                         max_position_embeddings=8192, **kw)


def _gpt_neox(hidden, ffn, layers, heads, **kw):
    """A GPT-NeoX (Pythia) config: attention and MLP in parallel off one residual."""
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                         vocab_size=50304, max_position_embeddings=8192, use_parallel_residual=True,
                         attention_dropout=0.0, hidden_dropout=0.0, **kw)


def _smollm2():
    """SmolLM2-135M-Instruct's config as the quality harness loads it."""
    from transformers import LlamaConfig

    from benchmarks.quality import SMOLLM2_CONFIG
    return LlamaConfig(**SMOLLM2_CONFIG)


#: Model configs by name (Hugging Face's published shapes); ``tiny-*`` ones are for CPU checks.
MODELS: Dict[str, Callable] = {
    "opt-350m": lambda: _opt(1024, 4096, 24, 16, proj=512, do_layer_norm_before=False),
    "opt-1.3b": lambda: _opt(2048, 8192, 24, 32),
    "opt-2.7b": lambda: _opt(2560, 10240, 32, 32),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    "gpt2-xl": lambda: _gpt2(1600, 48, 25),
    "llama-3.2-1b": lambda: _llama(2048, 8192, 16, 32, 8, tie_word_embeddings=True),
    "llama-3-8b": lambda: _llama(4096, 14336, 32, 32, 8),
    "qwen2-1.5b": lambda: _llama(1536, 8960, 28, 12, 2, vocab=151936, config="Qwen2Config", tie_word_embeddings=True),
    "phi-3-mini": lambda: _llama(3072, 8192, 32, 32, 32, vocab=32064, config="Phi3Config", pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2),
    "pythia-1.4b": lambda: _gpt_neox(2048, 8192, 24, 16),
    "smollm2-135m": lambda: _smollm2(),  # the quality harness's model (benchmarks.quality)
    "mixtral-8x7b": lambda: _llama(4096, 14336, 32, 32, 8, vocab=32000, config="MixtralConfig", num_local_experts=8,
                                   num_experts_per_tok=2),
    "tiny-opt": lambda: _opt(64, 256, 2, 4, vocab_size=256),
    "tiny-llama": lambda: _llama(64, 256, 2, 4, 2, vocab=256),
    "tiny-gpt2": lambda: _gpt2(64, 2, 4, vocab_size=256),
    "tiny-mixtral": lambda: _llama(64, 256, 2, 4, 2, vocab=256, config="MixtralConfig", num_local_experts=4,
                                   num_experts_per_tok=2),
}

#: LoRA on the attention's query and value projections, per architecture.
_QV = {"opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


def _peft_config(method: str, arch: str):
    import peft
    if method == "lora":
        return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    if method == "lora-qv":
        return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=_QV[arch])
    if method == "ia3":
        return peft.IA3Config()
    raise ValueError(f"unknown PEFT method {method!r}; choose from {METHODS}")


METHODS = ("lora", "lora-qv", "ia3", "adapter", "bitfit", "norms")


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter after a frozen linear (Houlsby et al., placed after the MLP as in
    Pfeiffer et al.): ``y + up(relu(down(y)))``, ``up`` starting at zero so training starts from
    the base model."""

    def __init__(self, base: nn.Module, width: int, size: int = 64, device=None, dtype=None):
        super().__init__()
        self.base = base
        self.down = nn.Linear(width, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, width, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.up(F.relu(self.down(y)))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _trainable_only(model: nn.Module, params) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


@dataclass(frozen=True)
class Variant:
    """One way to run the same training step."""

    name: str
    backend: str                     # eager / inductor / lecompile / sparselora (eager)
    tf32: bool = False
    adapters_fp32: bool = True       # PEFT's autocast_adapter_dtype
    cudagraphs: bool = False         # Inductor's mode="reduce-overhead" (CUDA graph trees)
    config: Optional[LongExposureConfig] = None
    quality_setting: Optional[str] = None  # the quality harness's setting this config is
    without: Optional[str] = None          # the pass this lecompile variant runs without (an ablation)

    @property
    def mlp_density(self) -> float:
        return self.config.mlp_density if self.config is not None else 1.0

    @property
    def attn_density(self) -> float:
        return self.config.attn_density if self.config is not None else 1.0


def variants(densities: Sequence[float] = (1.0, 0.5, 0.25, 0.15), predictor: str = "svd",
             granularity: str = "sequence", baselines: bool = True, cudagraphs: bool = False,
             attn_densities: Sequence[float] = (1.0,), attn_block: int = 128,
             settings: Optional[dict] = None, quality_settings: Sequence[str] = (),
             attn_kernels: Sequence[str] = ("triton",), mask_blocks: bool = False,
             without: Sequence[str] = ()) -> List[Variant]:
    """The baselines, then lecompile at each MLP density and attention density, then as each of
    ``quality_settings`` (:func:`quality_setting_config`). ``cudagraphs`` adds the strongest
    baseline and every lecompile variant replayed as CUDA graphs (suffix ``-cg``). ``settings``
    are further :class:`LongExposureConfig` fields of the density variants. Variants with sparse
    attention run once per ``attn_kernels`` entry (suffix ``-flash`` for ``attn_kernel="flash"``);
    ``mask_blocks`` adds each density variant with dense attention again with ``attn_mask_blocks``
    (suffix ``-mask-blocks``; Triton kernels: FlashAttention 4's take no token mask); each pass in
    ``without`` adds each density variant again with that pass disabled (suffix ``-without-<pass>``:
    what the pass buys, timed in the same process)."""
    def variant_fields(d, a, cg):  # what each lecompile variant sets itself
        return dict(mlp_density=d, predictor=predictor, granularity=granularity, cudagraphs=cg,
                    attn_density=a, attn_block=attn_block)

    def config(d, a, cg, **fields):  # ``fields`` over ``settings``: a -without variant's wider ``disable``
        return LongExposureConfig.create(**variant_fields(d, a, cg), **{**(settings or {}), **fields})

    clash = sorted(set(settings or {}) & {*variant_fields(1.0, 1.0, False), "attn_kernel", "attn_mask_blocks"})
    if clash:
        raise ValueError(f"settings {clash} are set per variant (use the densities, predictor, granularity, "
                         f"cudagraphs, attention-block, attention-kernel and mask-blocks options instead)")
    out = []
    if baselines:
        out = [Variant("eager", "eager"), Variant("eager-bf16-adapters", "eager", adapters_fp32=False),
               Variant("inductor", "inductor"), Variant("inductor-tf32", "inductor", tf32=True),
               Variant("inductor-bf16-adapters", "inductor", adapters_fp32=False)]
        if cudagraphs:
            out.append(Variant("inductor-bf16-adapters-cg", "inductor", adapters_fp32=False, cudagraphs=True))
        out += [Variant(f"sparselora-d{d:g}", "sparselora", config=LongExposureConfig(mlp_density=d))
                for d in densities if d < 1.0]
    for cg in (False, True) if cudagraphs else (False,):
        for a in attn_densities:
            for d in densities:
                stem = f"lecompile-d{d:g}" + (f"-a{a:g}" if a < 1.0 else "")
                for kernel in attn_kernels if a < 1.0 else ("triton",):
                    out.append(Variant(stem + _kernel_suffix(kernel, cg), "lecompile", cudagraphs=cg,
                                       config=config(d, a, cg, attn_kernel=kernel)))
                    for skipped in without:
                        disable = frozenset((settings or {}).get("disable", ())) | {skipped}
                        out.append(Variant(f"{stem}-without-{skipped}" + _kernel_suffix(kernel, cg), "lecompile",
                                           cudagraphs=cg, without=skipped,
                                           config=config(d, a, cg, attn_kernel=kernel, disable=disable)))
                if a == 1.0 and mask_blocks:
                    out.append(Variant(f"{stem}-mask-blocks" + _kernel_suffix("triton", cg), "lecompile",
                                       cudagraphs=cg, config=config(d, a, cg, attn_mask_blocks=True)))
        for setting in quality_settings:
            sparse_attention = quality_setting_config(setting, cg).attn_density < 1.0
            for kernel in attn_kernels if sparse_attention else ("triton",):
                out.append(Variant(f"lecompile-{setting}" + _kernel_suffix(kernel, cg), "lecompile", cudagraphs=cg,
                                   config=quality_setting_config(setting, cg, attn_kernel=kernel),
                                   quality_setting=setting))
    return out


def _block_attention(config: Optional[LongExposureConfig]) -> bool:
    """Whether ``config`` runs block attention (sparse, or exact over a token mask's blocks)."""
    return config is not None and (config.attn_density < 1.0 or config.tuning.attn_mask_blocks)


def _kernel_suffix(attn_kernel: str, cudagraphs: bool) -> str:
    return ("" if attn_kernel == "triton" else f"-{attn_kernel}") + ("-cg" if cudagraphs else "")


def quality_task(setting: str) -> Optional[str]:
    """The quality harness's task ``setting`` belongs to: the short mixed one (MLP settings) before
    the long-context recall one (attention settings); ``None`` for neither."""
    from benchmarks import quality
    return next((task for task in ("mixed", "recall") if setting in quality.settings(quality.STEPS, task)), None)


def quality_summary(setting: str, seq: Optional[int] = None) -> Optional[dict]:
    """``setting``'s summary in its task's results file (``benchmarks/results/quality.json``,
    ``quality_recall.json``, ``quality_recall_<seq>.json``), at ``seq`` tokens a row where that
    length was measured, else at the task's own; with ``seq`` set to the length it was measured
    at. ``None`` if not measured."""
    import json

    from benchmarks import quality
    task = quality_task(setting)
    if task is None:
        return None
    for name in dict.fromkeys([quality.results_name(task, seq), quality.results_name(task)]):
        path = RESULTS / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {"summary": []}
        found = next((s for s in data["summary"] if s["setting"] == setting), None)
        if found is not None:
            return {**found, "seq": data["meta"]["seq"]}
    return None


def quality_setting_config(setting: str, cudagraphs: bool, **tuning) -> LongExposureConfig:
    """The config of the quality harness's ``setting`` (:func:`benchmarks.quality.settings`) at the
    step count its quality was measured at (a schedule's dense warm-up is a share of
    ``total_steps``), with ``tuning`` settings that do not change its results (the attention's
    kernels, say); a ``ValueError`` names the settings there are."""
    from benchmarks import quality
    task, summary = quality_task(setting), quality_summary(setting)
    steps = summary["steps"] if summary else quality.STEPS
    options = quality.settings(steps, task).get(setting) if task else None
    if options is None:
        known = sorted({k for t in ("mixed", "recall") for k, v in quality.settings(steps, t).items() if v is not None})
        raise ValueError(f"{setting!r} is not a lecompile setting of the quality harness; choose from {known}")
    return LongExposureConfig.create(**options, cudagraphs=cudagraphs, **tuning)


@dataclass
class Case:
    model: str
    method: str
    batch: int
    seq: int
    layers: Optional[int] = None  # fewer decoder layers than the published model (to fit the GPU)
    checkpointing: bool = False   # Hugging Face's gradient checkpointing (non-reentrant) on every layer
    layer_breaks: bool = False    # a Dynamo graph break before every decoder layer: one graph per layer
    padded: bool = False          # an attention_mask with the last row left-padded (see batch_inputs)

    @property
    def name(self) -> str:
        layers = f" ({self.layers} layers)" if self.layers else ""
        checkpointing = " checkpointing" if self.checkpointing else ""
        breaks = " layer-breaks" if self.layer_breaks else ""
        padded = " padded" if self.padded else ""
        return f"{self.model}{layers} {self.method} {self.batch}x{self.seq}{checkpointing}{breaks}{padded}"


def batch_inputs(case: Case, vocab: int, device: str, generator: Optional[torch.Generator] = None) -> dict:
    """The model's keyword arguments for one step of ``case``: random ids as input and labels; with
    ``case.padded``, an ``attention_mask`` whose last row is left-padded by a quarter of the
    sequence (no labels there, nor on the first real token, which the last pad predicts), so the
    model's token mask depends on the batch, as a padded fine-tuning batch's does."""
    ids = torch.randint(0, vocab, (case.batch, case.seq), generator=generator).to(device)
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    if case.padded:
        pad = case.seq // 4
        mask = torch.ones_like(ids)
        mask[-1, :pad] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[-1, pad] = -100
        inputs.update(attention_mask=mask, labels=labels)
    return inputs


@dataclass
class StepResult:
    ms: float
    compile_s: float
    loss_step1: float
    peak_mem_gib: float
    extra: Dict[str, object] = field(default_factory=dict)


def build(case: Case, variant: Variant, device: str, dtype=torch.bfloat16):
    """The model of ``case`` with its PEFT method, seeded so every variant gets the same weights."""
    import peft
    from transformers import AutoModelForCausalLM
    config = MODELS[case.model]()
    if case.layers:
        config.num_hidden_layers = case.layers
    arch = config.model_type
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if case.method == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        if not biases:
            raise ValueError(f"{case.model} has no biases: BitFit does not apply")
        _trainable_only(model, biases)
    elif case.method == "norms":
        _trainable_only(model, [p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)])
    elif case.method != "adapter":
        model = peft.get_peft_model(model, _peft_config(case.method, arch),
                                    autocast_adapter_dtype=variant.adapters_fp32)
    if variant.backend == "sparselora":
        sparsify_mlps(model, arch, variant.mlp_density, rank=variant.config.tuning.svd_rank,
                       align=variant.config.tuning.k_align)
    if case.method == "adapter":  # after the MLPs are sliced: the adapter reads the MLP's output
        adapters = []
        for block in mlp_blocks(model, arch):
            adapters.append(BottleneckAdapter(block.layer.get_submodule(block.output), config.hidden_size,
                                              device=device, dtype=dtype))
            replace(block.layer, block.output, adapters[-1])
        _trainable_only(model, [p for a in adapters for p in (*a.down.parameters(), *a.up.parameters())])
    model.config.use_cache = False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if case.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.layer_breaks:
        compile_layers_once(base)
    if getattr(base, "loss_type", None) is None:  # GPT-2: transformers' warning would break the graph
        base.loss_type = "ForCausalLM"
    return model.train()


@contextlib.contextmanager
def _tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def run_variant(case: Case, variant: Variant, device: str, steps: int = 20, warmup: int = 3,
                wrap: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None) -> StepResult:
    """Compile (first step), warm up, then time ``steps`` training steps. ``wrap`` wraps the
    model before compiling (for example in ``DistributedDataParallel``)."""
    torch._dynamo.reset()
    counters.clear()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()  # the previous variant's model is gone: start from its memory
    model = build(case, variant, device)
    inputs = batch_inputs(case, model.config.vocab_size, device, torch.Generator().manual_seed(1))
    backend = None
    fn = wrap(model) if wrap is not None else model
    if variant.backend == "lecompile":
        backend = LongExposureBackend(variant.config)
        fn = torch.compile(fn, backend=backend)
    elif variant.backend == "inductor":
        fn = torch.compile(fn, mode="reduce-overhead" if variant.cudagraphs else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = fn(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    schedule = variant.quality_setting is not None  # a setting of the quality harness, whole schedule
    dense_steps = variant.config.dense_warmup_steps if schedule else 0
    if schedule and variant.config.calibrated:  # one refresh of the predictor in the timed steps
        steps = max(steps, variant.config.tuning.calibrate_every)
    with _tf32(variant.tf32):
        t0 = time.perf_counter()
        with autotuning() as tuned:
            loss1 = step().item()  # .item() waits for the GPU
        compile_s = time.perf_counter() - t0
        # The dense warm-up's steps after the first, timed; then the warm-up (the sparse form compiles).
        dense_times = [timed_ms(step, cuda) for _ in range(dense_steps - 1)]
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = [timed_ms(step, cuda) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # CUDA graph trees allocate from a private pool that max_memory_allocated() under-reports.
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    extra = {}
    if backend is not None:
        report = backend.report
        extra = {"mlp_rewritten": report.mlp_rewritten, "mlp_matched": len(report.mlp),
                 "attention_rewritten": report.attention_rewritten,
                 "lora_linears_fused": report.linears_fused,
                 "lora_linears_in_gemm": sum(e.in_gemm for e in report.linears),
                 "loss_fused": any(e.fused for e in report.losses),
                 "graphs_compiled": len(backend.reports),
                 "rewrites": dict(sorted(counters["lecompile"].items()))}  # each pass's hits (cleared per variant)
        if report.attention_kernels:  # what ran: attn_kernel="flash" hands what FA4 cannot run to the Triton kernels
            extra["attn_kernel"] = "+".join(report.attention_kernels)
    elif variant.backend == "sparselora":
        extra = {"mlp_rewritten": sum(isinstance(m, SlicedOutput) for m in model.modules())}
    extra["peak_reserved_gib"] = round(reserved, 3)
    extra["autotune_s"] = autotune_seconds(tuned)
    extra["autotune"] = autotune_record(tuned)
    limit = limit_ms(model, case, device)
    if limit is not None:
        extra.update(limit_ms=round(limit, 3), limit_ratio=round(limit / statistics.median(times), 3))
    # The mean counts the rare slow steps the median hides (calibration steps, one in calibrate_every).
    extra["mean_ms"] = round(statistics.mean(times), 3)
    if schedule:
        total = variant.config.total_steps
        warmup_ms = statistics.median(dense_times) if dense_times else 0.0
        mean = extra["mean_ms"]
        whole = (dense_steps * warmup_ms + (total - dense_steps) * mean) / total if total else mean  # 0: no schedule
        summary = quality_summary(variant.quality_setting, case.seq)
        extra.update(quality_setting=variant.quality_setting, dense_warmup_steps=dense_steps, total_steps=total,
                     warmup_ms=round(warmup_ms, 3), schedule_ms=round(whole, 3),
                     heldout_delta=summary["heldout_delta"] if summary else None,
                     quality_passes=summary["passes"] if summary else None,
                     quality_seeds=summary["seeds"] if summary else None,
                     quality_seq=summary["seq"] if summary else None)
    return StepResult(statistics.median(times), compile_s, loss1, peak, extra)


def gemm_rate(device: str) -> Optional[float]:
    """This GPU's bf16 GEMM rate in TFLOP/s (:data:`GEMM_TFLOPS`), ``None`` for other devices."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for word, tflops in GEMM_TFLOPS.items() if word in name), None)


def step_flops(model: nn.Module, case: Case) -> Dict[str, float]:
    """The least FLOPs of one LoRA step's parts: ``base_gemm``, 4 per frozen weight and token (the
    forward GEMM and the backward's input gradient; frozen weights get no weight gradient);
    ``adapter_gemm``, 6 T r (in + out) per LoRA linear (two products forward, four backward);
    ``attention``, 6 S^2 D per layer and sequence (scores and weighted sum forward, four products
    backward, half of each under the causal mask). Stacked MoE experts (3-D weights) and their
    adapters count at the share of experts each token is routed to."""
    tokens = case.batch * case.seq
    config = model.config
    routed = getattr(config, "num_experts_per_tok", 1) / max(getattr(config, "num_local_experts", 1), 1)
    base = adapters = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            base += module.weight.numel()
        base += routed * sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 3)
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        share = routed if getattr(module, "num_experts", 1) > 1 else 1.0  # PEFT's LoRA on stacked experts
        if isinstance(lora_a, nn.ModuleDict):
            for key in lora_a:
                rank, width_in = lora_a[key].weight.shape
                adapters += share * rank * (width_in + lora_b[key].weight.shape[0])
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"base_gemm": 4.0 * base * tokens, "adapter_gemm": 6.0 * adapters * tokens,
            "attention": 6.0 * config.num_hidden_layers * case.batch * case.seq ** 2 * width}


def limit_ms(model: nn.Module, case: Case, device: str) -> Optional[float]:
    """The step's physical limit in ms on this GPU (``None`` on others): its base GEMMs and
    attention (:func:`step_flops`; adapters are negligible) at the GPU's bf16 GEMM rate."""
    rate = gemm_rate(device)
    if rate is None:
        return None
    parts = step_flops(model, case)
    return (parts["base_gemm"] + parts["attention"]) / (rate * 1e12) * 1e3


def timed_ms(step: Callable[[], object], cuda: bool) -> float:
    """Milliseconds one call of ``step`` takes: GPU time between CUDA events, or wall time."""
    if not cuda:
        t = time.perf_counter()
        step()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run_case(case: Case, variant_list: Sequence[Variant], device: str, steps: int = 20,
             warmup: int = 3, progress=None, on_row: Optional[Callable[[dict], None]] = None,
             variant_timeout: Optional[float] = None, inductor_options: Optional[dict] = None) -> List[dict]:
    """Every variant of ``case``, with ratios to the baselines measured in this call.
    ``on_row`` sees each row as soon as it is measured (to save partial results). With
    ``variant_timeout``, each variant runs in a process of its own under ``inductor_options``
    (:func:`benchmarks.own_process.in_own_process`), killed and recorded as timed out after that
    many seconds, and the next one runs; its compile then finds only the on-disk caches of the
    variants before it."""
    rows = []
    layers = case.layers or MODELS[case.model]().num_hidden_layers
    for v in variant_list:
        if progress is not None:
            progress.set_postfix_str(f"{case.name} {v.name}")
        row = dict(case=case.name, model=case.model, method=case.method, batch=case.batch, seq=case.seq,
                   layers=layers, checkpointing=case.checkpointing, layer_breaks=case.layer_breaks,
                   padded=case.padded, tokens=case.batch * case.seq, dtype="bfloat16", variant=v.name,
                   mlp_density=v.mlp_density, attn_density=v.attn_density, tf32=v.tf32,
                   adapters="fp32" if v.adapters_fp32 else "bf16", cudagraphs=v.cudagraphs,
                   **({"without": v.without} if v.without else {}),
                   **({"attn_kernel": v.config.tuning.attn_kernel} if _block_attention(v.config) else {}))
        try:
            if variant_timeout is None:
                r = run_variant(case, v, device, steps, warmup)
            else:
                r = StepResult(**in_own_process(_run_variant_with, (inductor_options or {}, case, v, device, steps,
                                                                    warmup), variant_timeout, "--variant-timeout"))
            row.update(ms=round(r.ms, 3), tokens_per_s=round(case.batch * case.seq / r.ms * 1e3),
                       peak_mem_gib=round(r.peak_mem_gib, 3), compile_s=round(r.compile_s, 1),
                       loss_step1=round(r.loss_step1, 5), **r.extra)
        except Exception as err:  # a case that cannot run is recorded, not dropped
            log.warning("%s %s failed: %r", case.name, v.name, err)
            row["error"] = repr(err)[:400]
            if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, ProcessFailed) and err.out_of_memory):
                row["out_of_memory"] = True
            if isinstance(err, ProcessTimeout):
                row["timed_out"] = True
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if progress is not None:
            progress.update()
    add_ratios(rows)
    return rows


def _run_variant_with(inductor_options: dict, *args) -> dict:
    """:func:`run_variant` under ``inductor_options`` (a spawned process starts from the defaults),
    its result as a dict: run as ``python -m``, this module is ``__mp_main__`` in the spawned
    process, a name the parent cannot unpickle its classes from."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(inductor_options):
        return asdict(run_variant(*args))


def add_adapter_shares(rows: List[dict]) -> None:
    """``adapter_share = 1 - ms(norms) / ms(lora)`` on each LoRA row with a ``norms`` row of the
    same model, shape and variant: the share of the step that LoRA's adapters add."""
    def same(r):
        return (r["model"], r["layers"], r["batch"], r["seq"], r.get("checkpointing", False),
                r.get("layer_breaks", False), r.get("padded", False), r["variant"])

    norms = {same(r): r["ms"] for r in rows if r["method"] == "norms" and "ms" in r}
    for r in rows:
        base = norms.get(same(r))
        if r["method"] == "lora" and "ms" in r and base is not None:
            r["adapter_share"] = round(1.0 - base / r["ms"], 3)


def add_ratios(rows: List[dict]) -> None:
    """Each row's speedups over the baselines among ``rows`` (one case of one run)."""
    by = {r["variant"]: r for r in rows if "ms" in r}
    eager, inductor = by.get("eager"), by.get("inductor")
    strongest = min((r for n, r in by.items() if n.startswith("inductor")), key=lambda r: r["ms"], default=None)
    for r in rows:
        if "ms" not in r:
            continue
        if inductor is not None:
            r.update(baseline="inductor", baseline_ms=inductor["ms"], speedup=round(inductor["ms"] / r["ms"], 3))
        if eager is not None:
            r.update(speedup_vs_eager=round(eager["ms"] / r["ms"], 3),
                     mem_vs_eager=round(r["peak_mem_gib"] / eager["peak_mem_gib"], 3)
                     if eager["peak_mem_gib"] == eager["peak_mem_gib"] else None)
            if r["mlp_density"] == 1.0 and r["attn_density"] == 1.0:
                r["loss_matches_eager"] = math.isclose(r["loss_step1"], eager["loss_step1"], rel_tol=LOSS_RTOL)
        if strongest is not None:
            r.update(strongest_baseline=strongest["variant"], strongest_compile_s=strongest.get("compile_s"),
                     speedup_vs_strongest=round(strongest["ms"] / r["ms"], 3))
            if "schedule_ms" in r:
                r["schedule_speedup_vs_strongest"] = round(strongest["ms"] / r["schedule_ms"], 3)
        sparselora = by.get(f"sparselora-d{r['mlp_density']:g}")
        if sparselora is not None and r["variant"].startswith("lecompile"):
            r["speedup_vs_sparselora"] = round(sparselora["ms"] / r["ms"], 3)
        dense = by.get("lecompile-d1" + ("-cg" if r.get("cudagraphs") else ""))  # the exact variant, same replay
        if dense is not None and r["variant"].startswith("lecompile") and dense is not r:
            # CUDA graphs allocate from private pools that the allocator's peak misses: compare
            # what those rows reserved.
            memory = "peak_reserved_gib" if r.get("cudagraphs") and "peak_reserved_gib" in dense else "peak_mem_gib"
            r.update(speedup_vs_d1=round(dense["ms"] / r["ms"], 3),
                     mem_vs_d1=round(r[memory] / dense[memory], 3) if dense[memory] == dense[memory] else None)


def training_step(case: Case, variant: Variant, device: str) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, AdamW) of ``case``'s model on random ids, run as
    ``variant`` runs it (lecompile with its config, Inductor, or eager), as a function to call repeatedly;
    it returns the step's loss; ``step.model`` is the model, ``step.backend`` lecompile's backend
    (``None`` for other variants)."""
    model = build(case, variant, device)
    inputs = batch_inputs(case, model.config.vocab_size, device)
    torch._dynamo.reset()
    backend = None
    if variant.backend == "lecompile":
        backend = LongExposureBackend(variant.config)
        fn = torch.compile(model, backend=backend)
    elif variant.backend == "inductor":
        fn = torch.compile(model, mode="reduce-overhead" if variant.cudagraphs else None)
    else:
        fn = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with _tf32(variant.tf32):
            loss = fn(**inputs).loss
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    step.model, step.backend = model, backend
    return step


SHAPES = {"8x512": (8, 512), "4x1024": (4, 1024), "2x2048": (2, 2048),
          "8x256": (8, 256),  # the quality harness's batches
          # long-context fine-tuning: one sequence per step
          "1x4096": (1, 4096), "1x8192": (1, 8192), "1x16384": (1, 16384), "1x32768": (1, 32768),
          "1x65536": (1, 65536)}  # LLaMA-3-8B's fp32 logits alone take 31 GiB here: Inductor's step may not fit


#: Cases in the plot: the newest ones (docs/results.md tables every case).
PLOTTED_CASES = 12


def newest_cases(latest: Dict[tuple, dict], limit: int = PLOTTED_CASES) -> List[str]:
    """The ``limit`` cases measured last (rows of a fresh run, without ``run``, count as newest), in
    the order they were first measured."""
    cases = list(dict.fromkeys(case for case, _ in latest))
    newest = {case: max(r.get("run", math.inf) for (c, _), r in latest.items() if c == case) for case in cases}
    kept = set(sorted(cases, key=lambda c: newest[c], reverse=True)[:limit])
    return [case for case in cases if case in kept]


def plot(rows: List[dict], path) -> None:
    """Per case (latest run of each variant; the :data:`PLOTTED_CASES` newest cases): the step
    speedup of eager PEFT, the SparseLoRA-style baseline and every CUDA-graph variant over Inductor
    with PEFT's defaults, and the peak memory of the variants without CUDA graphs (whose pools the
    allocator's peak does not count) over eager's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    latest = {(r["case"], r["variant"]): r for r in rows if "ms" in r}  # rows come in run order
    cases = newest_cases(latest)
    latest = {(c, v): r for (c, v), r in latest.items() if c in cases}
    panels = [
        ("speedup", lambda v: v == "eager" or v.startswith("sparselora") or v.endswith("-cg"),
         "step speedup over Inductor (PEFT defaults)", "training step, same run's Inductor = 1"),
        ("mem_vs_eager", lambda v: v != "eager" and not v.endswith("-cg"),
         "peak memory / eager PEFT's", "peak memory allocated, without CUDA graphs"),
    ]
    fig, axes = plt.subplots(4, 1, figsize=(max(8.0, 1.6 * len(cases) + 4), 17))
    fig.suptitle(f"the {len(cases)} newest cases; every case in docs/results.md", fontsize=9)
    for ax, (key, shown, ylabel, title) in zip(axes, panels):
        names = [v for v in dict.fromkeys(v for _, v in latest) if shown(v)
                 and any(latest.get((c, v), {}).get(key) is not None for c in cases)]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            values = [(latest.get((c, name)) or {}).get(key) for c in cases]
            xs = [j + i * width for j, value in enumerate(values) if value is not None]
            ax.bar(xs, [value for value in values if value is not None], width, label=name)
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=8, rotation=15)
        ax.set(ylabel=ylabel, title=title)
        if names:
            ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _plot_density_curves(axes[2], latest, cases)
    _plot_quality_points(axes[3], latest, cases)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)


def density_curves(latest: Dict[tuple, dict], cases: Sequence[str]) -> Dict[str, List[tuple]]:
    """Per case, ``(MLP density, speedup over the strongest baseline)`` of its lecompile CUDA-graph
    variants with dense attention at fixed densities, by density (cases with at least two
    densities). The strongest baseline replays CUDA graphs, so its time is stable across runs."""
    curves = {}
    for case in cases:
        points = sorted((r["mlp_density"], r["speedup_vs_strongest"]) for (c, v), r in latest.items()
                        if c == case and v.startswith("lecompile") and v.endswith("-cg")
                        and r.get("attn_density") == 1.0 and r.get("speedup_vs_strongest") is not None
                        and "quality_setting" not in r)  # a schedule's density is not its compute
        if len(points) > 1:
            curves[case] = points
    return curves


def quality_points(latest: Dict[tuple, dict], cases: Sequence[str]) -> Dict[str, List[tuple]]:
    """Per case with a quality setting timed, ``(held-out loss change in %, speedup over the strongest
    baseline, label)`` of its CUDA-graph quality-setting variants and, at 0 (exact), density 1.0."""
    points = {}
    for case in cases:
        rows = [r for (c, v), r in latest.items() if c == case and v.endswith("-cg")
                and r.get("speedup_vs_strongest") is not None]
        timed = [(100 * r["heldout_delta"], r["speedup_vs_strongest"], _setting_label(r))
                 for r in rows if r.get("quality_setting") and r.get("heldout_delta") is not None]
        if timed:
            exact = [(0.0, r["speedup_vs_strongest"], "density 1.0") for r in rows if r["variant"] == "lecompile-d1-cg"]
            points[case] = exact + timed
    return points


def _setting_label(row: dict) -> str:
    """A quality setting's name, with its attention kernel where it is not the default."""
    kernel = row.get("attn_kernel", "triton")
    return row["quality_setting"] + ("" if kernel == "triton" else f" ({kernel})")


def _plot_quality_points(ax, latest, cases) -> None:
    for i, (case, points) in enumerate(quality_points(latest, cases).items()):
        xs, ys, _ = zip(*points)
        ax.scatter(xs, ys, color=f"C{i}", label=case)
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=1)
    ax.axvline(1.0, color="red", lw=0.8, ls="--")  # the quality harness's rule: within 1% of dense LoRA
    ax.set(xlabel="held-out answer loss vs dense LoRA, % (quality harness, SmolLM2-135M)",
           ylabel="step speedup over the strongest baseline\n(a schedule's: after its dense warm-up)",
           title="speed beside quality: settings the quality harness measured, with CUDA graphs")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")


def _plot_density_curves(ax, latest, cases) -> None:
    for case, points in density_curves(latest, cases).items():
        ax.plot(*zip(*points), marker="o", label=case)
    ax.axhline(1.0, color="grey", lw=1)
    ax.set(xlabel="MLP density", ylabel="step speedup over the strongest baseline",
           title="lecompile with CUDA graphs against Inductor + bf16 adapters + CUDA graphs, fixed MLP densities: "
                 "speed only (the quality each keeps: docs/results.md)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")


def check_layers(layers: Optional[int]) -> None:
    """Refuse a ``--layers`` value that builds no decoder layer."""
    if layers is not None and layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=["opt-1.3b"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["lora"], choices=METHODS)
    parser.add_argument("--shapes", nargs="+", default=["8x512"], choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=None,
                        help="build the models with this many decoder layers (default: all)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (non-reentrant) on every decoder layer, every variant")
    parser.add_argument("--layer-breaks", nargs="?", const="also", choices=["also", "only"],
                        help="each case also (or, 'only', only) with a Dynamo graph break before every decoder "
                             "layer (lecompile.compile_layers_once: each distinct layer compiles once; with "
                             "'also', what the breaks cost: the two rows side by side)")
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.15])
    parser.add_argument("--attn-densities", nargs="+", type=float, default=[1.0],
                        help="attention densities of the lecompile variants (1.0: dense attention)")
    parser.add_argument("--attn-block", type=int, default=128, help="tokens per attention block")
    parser.add_argument("--attn-kernels", nargs="+", default=["triton"], choices=ATTN_KERNELS,
                        help="the kernels of the variants with sparse attention, each a variant of its own (flash: "
                             "FlashAttention 4's, suffix -flash)")
    parser.add_argument("--padded", action="store_true",
                        help="batches with an attention_mask, the last row left-padded by a quarter (the model's "
                             "token mask then depends on the batch: what attn_mask_blocks is for)")
    parser.add_argument("--mask-blocks", action="store_true",
                        help="add each lecompile variant with dense attention again with attn_mask_blocks (the "
                             "model's masked SDPA as exact block attention; suffix -mask-blocks). Without --padded "
                             "the model's mask is only causal and the causal_masks pass drops it: these variants "
                             "then run as the ones without it")
    parser.add_argument("--without", nargs="+", default=[], metavar="PASS", choices=OPTIONAL_PASSES,
                        help="add each lecompile density variant again without each of these passes (suffix "
                             "-without-PASS; its speedup_vs_d1 is what the pass buys, timed in this process)")
    parser.add_argument("--predictor", default="svd", choices=sorted(PREDICTORS))
    parser.add_argument("--granularity", default="sequence", choices=("sequence", "tile", "batch"))
    parser.add_argument("--no-baselines", action="store_true", help="lecompile variants only")
    parser.add_argument("--quality-settings", nargs="+", default=[], metavar="SETTING",
                        help="lecompile variants configured as these settings of the quality harness (e.g. "
                             "schedule-learned-0.5, attn-0.5): whole schedule, rows with the held-out loss change "
                             "measured")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="settings of every lecompile variant, e.g. svd_rank=16 disable=fuse_loss")
    parser.add_argument("--inductor-option", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config values for every compiled variant (Inductor baselines and "
                             "lecompile alike), e.g. combo_kernels=true")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="add CUDA-graph variants (-cg) of the strongest baseline and of lecompile")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="run only these variants (names as in the results, e.g. eager lecompile-d0.25-cg)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant-timeout", type=float, default=None, metavar="SECONDS",
                        help="run each variant in a process of its own and kill it (its compile workers "
                             "too) after this long, recording it as timed out (default: no limit, one process)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=str(RESULTS),
                        help="folder for e2e.json and e2e.png (default: benchmarks/results)")


def run(args) -> dict:
    """Run the benchmark described by parsed ``args``; write JSON and plot; return the data."""
    from pathlib import Path

    import torch._inductor.config as inductor_config
    from tqdm.auto import tqdm

    try:
        import matplotlib  # noqa: F401  (the plot comes last: fail before measuring, not after)
    except ImportError:
        raise RuntimeError("the benchmark plots its results: pip install 'lecompile[bench]'") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_layers(args.layers)
    if args.variant_timeout is not None and args.variant_timeout <= 0:
        raise ValueError(f"--variant-timeout must be > 0 seconds, got {args.variant_timeout}")
    cases = [Case(m, meth, *SHAPES[s], layers=args.layers, checkpointing=args.checkpointing, layer_breaks=breaks,
                  padded=args.padded)
             for m in args.models for meth in args.methods for s in args.shapes
             for breaks in {"also": (False, True), "only": (True,), None: (False,)}[args.layer_breaks]]
    settings = LongExposureConfig.parse_settings(args.set)
    inductor_options = parse_inductor_options(args.inductor_option)
    vs = variants(args.densities, args.predictor, args.granularity, baselines=not args.no_baselines,
                  cudagraphs=args.cudagraphs, attn_densities=args.attn_densities, attn_block=args.attn_block,
                  settings=settings, quality_settings=args.quality_settings, attn_kernels=args.attn_kernels,
                  mask_blocks=args.mask_blocks, without=args.without)
    if args.variants:
        unknown = set(args.variants) - {v.name for v in vs}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; with these options: {[v.name for v in vs]}")
        vs = [v for v in vs if v.name in args.variants]
    rows: List[dict] = []
    out = Path(args.out)
    data = {"meta": meta("e2e", command_line(), settings=dict(
        steps=args.steps, warmup=args.warmup, optimizer="AdamW", predictor=args.predictor,
        granularity=args.granularity, attn_block=args.attn_block, attn_predictor="pooled",
        lecompile_settings=settings, inductor_options=inductor_options, init="random, seed 0")),
        "rows": rows}

    measured: List[dict] = []  # rows so far, saved as they come in case the run is cut short

    def save_partial(row):
        measured.append(row)
        write_results("e2e", dict(data, rows=measured), out)

    with inductor_config.patch(inductor_options):
        with tqdm(total=len(cases) * len(vs), desc="e2e", unit="run") as bar:
            for case in cases:
                rows += run_case(case, vs, device, args.steps, args.warmup, progress=bar, on_row=save_partial,
                                 variant_timeout=args.variant_timeout, inductor_options=inductor_options)
                add_adapter_shares(rows)
                write_results("e2e", data, out)  # with the case's ratios
    path = write_results("e2e", data, out)
    plot(rows, out / "e2e.png")
    print(format_rows(rows))
    print(f"wrote {path} and {out / 'e2e.png'}")
    return data


def parse_inductor_options(items: Sequence[str]) -> dict:
    """``["combo_kernels=true", ...]`` as ``torch._inductor.config`` values, each of the type of the
    option's current value (bool, int, float, str; for options without one of those, ``true``/``false``,
    numbers, else the string). An unknown key, a value of the wrong type or an item without ``=``
    names itself."""
    import torch._inductor.config as inductor_config
    options = {}
    for item in items:
        key, sep, raw = (part.strip() for part in item.partition("="))
        current = _option(inductor_config, key)
        if not sep or current is _MISSING:
            raise ValueError(f"--inductor-option {item!r} is not KEY=VALUE with KEY a torch._inductor.config option")
        try:
            options[key] = _option_value(raw, current)
        except ValueError:
            raise ValueError(f"--inductor-option {item!r}: {key} takes {type(current).__name__} values") from None
    return options


def _option_value(raw: str, current):
    kind = type(current) if isinstance(current, (bool, int, float, str)) else None
    if kind is bool or (kind is None and raw.lower() in ("true", "false")):
        if raw.lower() not in ("true", "false"):
            raise ValueError(raw)
        return raw.lower() == "true"
    if kind is not None:
        return kind(raw)
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


_MISSING = object()


def _option(config, key: str):
    """``config``'s value of ``key``, dotted keys (``triton.cudagraphs``) included, or ``_MISSING``."""
    try:
        return functools.reduce(getattr, key.split("."), config)
    except AttributeError:
        return _MISSING


def format_rows(rows: List[dict]) -> str:
    from lecompile.report import format_table
    cols = ["case", "variant", "ms", "tokens_per_s", "peak_mem_gib", "compile_s", "loss_step1",
            "speedup", "speedup_vs_eager", "speedup_vs_strongest", "speedup_vs_sparselora"]
    return format_table(cols, [[r.get(c, r.get("error", "-") if c == "ms" else "-") for c in cols] for r in rows])


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
