"""The one place gemma4-tune changes a library's internals. Each patch is version-gated, and a test
(tests/test_distributed.py) fails as soon as the upstream release no longer has the bug.

accelerate on a machine without an accelerator (failure-catalog row 27): under ``torchrun`` with
DeepSpeed, ``PartialState._prepare_backend`` returns no backend, so every process runs as
``DistributedType.NO`` with one process, N separate jobs that each see the whole data; and
``AcceleratorState`` promotes only accelerator types (``MULTI_GPU``...) to ``FSDP``, so an FSDP2 run
on CPU silently trains as plain DDP. On GPUs neither patch is applied.

transformers' Gemma 4 12B (``gemma4_unified``, failure-catalog row 31) builds two different image masks.
Its plain forward (also what ``generate()`` runs with the default dynamic cache) passes the image blocks
to the generic ``create_masks_for_generate``, which ORs each block into every layer's mask after the
sliding window: image tokens attend bidirectionally on the global layers and past the window. The model
class's own ``create_masks_for_generate`` (``create_masks_for_vision_model``; ``generate()`` uses it only
with a static cache) keeps the global layers causal and the window, as the other Gemma 4 models' forward
does since transformers#46850, and as Google's reference and llama.cpp (#28335) do. Measured on the tiny
12B: greedy generation with a static and with a dynamic cache differ by 2.3 in the first logits. Training
on the plain forward would learn under masks llama.cpp does not serve with. A forward pre-hook hands
every forward the class's own masks through its public input (``attention_mask`` as a dict of masks);
no library code is replaced. tests/test_12b.py fails once a release makes the two agree.

PEFT's LoRA on a parameter that already carries a parametrization (QLoRA's 4-bit MoE experts: bitsandbytes'
``replace_parameter_4bit`` dequantizes them on access, issue 32) has two bugs in the releases below, both silent or
late: (a) ``ParamWrapper._remove_parametrizations`` only recognises ``_LoraParameterProxy`` when the parameter has
more than one parametrization, so the single-adapter expert path's ``_LoraFactorsProxy`` is never removed and piles
up (the second step fails with "only Tensors of floating point dtype can require gradients"); (b) with two expert
parameters of one module wrapped (``gate_up_proj`` around ``down_proj``), the outer wrapper's
``parametrize.cached()`` is active when the inner one reads its parameter, which caches the 4-bit value *before*
its LoRA under the same key: the inner LoRA never reaches the forward and trains nothing (half of the expert LoRA
tensors get no gradient). :func:`patch_peft_parametrized_lora` fixes both at those two methods; it is applied only
when experts are quantized, and tests/test_qlora.py fails once a release no longer has either bug.

TRL's fused LM head (DPO, KTO and GRPO log-probabilities) projects every position onto the vocabulary on the CPU
and masks afterwards; :func:`patch_trl_compact_log_probs` makes it take its own compact path (labelled positions
only) there too.

bitsandbytes' CPU inference path for AVX512-BF16 processors (:func:`keep_4bit_weights_unpacked`): a ``Linear4bit``
called in eval mode without gradients repacks its weight *in place* into a CPU-only layout
(``_convert_weight_packed_for_cpu``), which asserts that the output size is a multiple of 32 (the tiny models' are
not: "N must be divisible by block_n", or a reshape error) and leaves ``weight.data`` in a layout that is no longer
the NF4 data training computed with. Measured on this machine (avx512_bf16): every QLoRA run crashed at its first
evaluation. The switch is the module's own ``support_avx512bf16_for_cpu`` attribute, set off after loading, so
training and evaluation compute with the same kernel on every processor; tests/test_qlora.py fails once a release
packs safely.

The only other patch is to files, not to code in this process: llama.cpp's prebuilt libraries are
rebound to glibc < 2.38 at install time (``engines/glibc_compat.py``, beside the engine install it
serves; tested the same way).
"""

from __future__ import annotations

from typing import Any

from packaging.version import Version

#: accelerate releases known to have the row-27 behaviour (the range pyproject.toml pins).
ACCELERATE_AFFECTED = (Version("1.15.0"), Version("1.16.0"))
#: transformers releases whose gemma4_unified forward masks image tokens unlike its own mask function (row 31).
UNIFIED_MASK_AFFECTED = (Version("5.23.0"), Version("5.24.0"))
_UNIFIED_HOOK = "_gemma4_tune_image_masks"
#: PEFT releases whose ParamWrapper mishandles a parameter with another parametrization (4-bit experts).
PEFT_PARAMETRIZED_AFFECTED = (Version("0.21.0"), Version("0.22.0"))
#: bitsandbytes releases whose AVX512-BF16 CPU path repacks 4-bit weights in place and asserts on their shape.
BNB_CPU_PACKING_AFFECTED = (Version("0.50.0"), Version("0.51.0"))
#: TRL releases whose fused LM head scores every position on the CPU (issue 33 item 6).
TRL_EVERY_POSITION_AFFECTED = (Version("1.16.0"), Version("1.17.0"))


def accelerate_is_affected() -> bool:
    """True for the accelerate releases whose CPU launch behaviour the patch below corrects."""
    import accelerate

    low, high = ACCELERATE_AFFECTED
    return low <= Version(accelerate.__version__) < high


def patch_accelerate_for_cpu_launch() -> bool:
    """Make accelerate see a ``torchrun`` launch on CPU as one job of WORLD_SIZE processes over gloo, and
    honour the FSDP plugin there. Applied only without CUDA, under a launcher, on affected releases;
    returns whether it is in effect."""
    import torch

    from gemma4_tune.ranks import under_launcher

    if torch.cuda.is_available() or not under_launcher() or not accelerate_is_affected():
        return False
    from accelerate import state
    from accelerate.utils import DistributedType

    if getattr(state.PartialState._prepare_backend, "_gemma4_tune", False):
        return True
    prepare_backend = state.PartialState._prepare_backend
    accelerator_init = state.AcceleratorState.__init__

    def _prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False,
                         backend: str | None = None) -> tuple[str | None, Any]:
        chosen, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if chosen is None:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    def _accelerator_init(self: Any, *args: Any, **kwargs: Any) -> None:
        accelerator_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    _prepare_backend._gemma4_tune = True  # type: ignore[attr-defined]
    state.PartialState._prepare_backend = _prepare_backend
    state.AcceleratorState.__init__ = _accelerator_init
    return True


def unified_masks_are_affected() -> bool:
    """True for the transformers releases whose gemma4_unified forward builds the other image masks."""
    import transformers

    low, high = UNIFIED_MASK_AFFECTED
    return low <= Version(transformers.__version__) < high


def model_image_masks(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The per-layer-type masks the 12B's class builds for ``inputs`` (input_ids, attention_mask,
    mm_token_type_ids, optional position_ids / past_key_values): its own ``create_masks_for_generate``."""
    import torch

    ids = inputs["input_ids"]
    # masks read only the batch size, length, dtype and device of the embeddings (as generate() passes them)
    embeds = torch.empty((*ids.shape, 0), dtype=model.dtype, device=ids.device)
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        cache = inputs.get("past_key_values")
        start = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(ids.shape[1], device=ids.device) + start).unsqueeze(0)
    return type(model).create_masks_for_generate(model.config, embeds, inputs.get("attention_mask"),
                                                 inputs.get("past_key_values"), position_ids,
                                                 mm_token_type_ids=inputs["mm_token_type_ids"])


def use_model_image_masks(model: Any) -> bool:
    """On affected releases, make every forward of a Gemma 4 12B with images use its class's own image
    masks (see the module doc). ``model``: the transformers model (or a PEFT model around it). Returns
    whether the hook is in place; idempotent."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if base.config.model_type != "gemma4_unified" or inner is None or not unified_masks_are_affected():
        return False
    if getattr(inner, _UNIFIED_HOOK, False):
        return True

    def hook(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        text = base.config.get_text_config()
        if (kwargs.get("mm_token_type_ids") is None or kwargs.get("input_ids") is None or args
                or isinstance(kwargs.get("attention_mask"), dict) or text.use_bidirectional_attention != "vision"):
            return args, kwargs
        return args, {**kwargs, "attention_mask": model_image_masks(base, kwargs)}

    inner.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(inner, _UNIFIED_HOOK, True)
    return True


def uses_model_image_masks(model: Any) -> bool:
    """Whether :func:`use_model_image_masks` is in effect on ``model`` (or the PEFT model around it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(base, "model", None), _UNIFIED_HOOK, False))


def peft_parametrized_is_affected() -> bool:
    """True for the PEFT releases whose LoRA on an already parametrized parameter has the two bugs above."""
    import peft

    low, high = PEFT_PARAMETRIZED_AFFECTED
    return low <= Version(peft.__version__) < high


def patch_peft_parametrized_lora() -> bool:
    """Make PEFT's ``ParamWrapper`` remove its own proxy whatever its kind, and read its parameter afresh inside an
    outer wrapper's cache (see the module doc). Idempotent; returns whether it is in effect."""
    if not peft_parametrized_is_affected():
        return False
    from contextlib import contextmanager

    from peft.tuners.lora import layer
    from torch.nn.utils import parametrize

    wrapper = layer.ParamWrapper
    if getattr(wrapper._activate_lora, "_gemma4_tune", False):
        return True
    remove, activate = wrapper._remove_parametrizations, wrapper._activate_lora

    def _remove_parametrizations(self: Any) -> None:
        stack = self.get_base_layer().parametrizations[self.parameter_name]
        if len(stack) > 1 and isinstance(stack[-1], layer._LoraFactorsProxy):
            del stack[-1]  # the proxy this wrapper registered last, as the upstream branch does for the other kind
            return
        remove(self)

    @contextmanager
    def _activate_lora(self: Any, active_adapters: list[str]) -> Any:
        with activate(self, active_adapters):  # its proxy registered: drop the value an outer cache kept without it
            parametrize._cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    _activate_lora._gemma4_tune = True  # type: ignore[attr-defined]
    wrapper._remove_parametrizations = _remove_parametrizations
    wrapper._activate_lora = _activate_lora
    return True


def trl_scores_every_position() -> bool:
    """True for the TRL releases whose fused LM head (DPO, KTO, GRPO log-probabilities) projects every position onto
    the vocabulary wherever Triton does not run (the CPU), masking afterwards, instead of the labelled ones only."""
    import trl

    low, high = TRL_EVERY_POSITION_AFFECTED
    return low <= Version(trl.__version__) < high


def patch_trl_compact_log_probs() -> bool:
    """Let TRL's fused LM head score only the labelled positions on the CPU too (see below). Idempotent; returns
    whether it is in effect.

    TRL 1.16's ``add_fused_lm_head`` takes its compact path (``hidden_states[mask]``, ``masked_scatter`` back) only
    where ``_use_triton`` is true (CUDA, XPU): elsewhere it keeps every position so that an accelerator compiling
    per shape (Neuron) sees one tile shape. On the CPU nothing is compiled, and the wide path projects every
    position of prompt and answer on the 262,144-token vocabulary: measured (bench/methods_real_vocab.py) 73% of a
    DPO step, 592 positions projected where about 38 are answers. The compact path is plain torch; the kernel's own
    choice between Triton and torch tiles is not touched. tests/test_grpo.py fails once a release scores compactly
    on the CPU itself."""
    if not trl_scores_every_position():
        return False
    import torch
    from trl.trainer import utils

    original = utils._use_triton
    if getattr(original, "_gemma4_tune", False):
        return True

    def compact_on_cpu(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    compact_on_cpu._gemma4_tune = True  # type: ignore[attr-defined]
    utils._use_triton = compact_on_cpu
    return True


def bnb_packs_cpu_weights() -> bool:
    """True for the bitsandbytes releases whose AVX512-BF16 CPU inference path repacks 4-bit weights in place."""
    import bitsandbytes

    low, high = BNB_CPU_PACKING_AFFECTED
    return low <= Version(bitsandbytes.__version__) < high


def keep_4bit_weights_unpacked(model: Any) -> int:
    """Turn bitsandbytes' in-place AVX512-BF16 repacking off on every ``Linear4bit`` of ``model`` (see above);
    the number of modules switched (0 where the release is not affected)."""
    if not bnb_packs_cpu_weights():
        return 0
    import bitsandbytes as bnb

    modules = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in modules:
        module.support_avx512bf16_for_cpu = False
    return len(modules)
