"""4-bit base weights (QLoRA): one definition of a run's quantization, how it loads, and the weights it trained on.

A QLoRA adapter is trained against the base's weights *after* 4-bit rounding, not against the original ones:
the model you trained is the 4-bit base + the adapter (failure-catalog row 38). :class:`QuantSpec` says exactly
how the base was quantized (bitsandbytes' type, block size, double quantization, compute dtype, the dtype the
weights were in when quantized, the library version, and which modules it replaced); it goes into the adapter's
manifest so that verify loads the same model as reference and export merges into the same weights
(:func:`dequantized` reproduces bitsandbytes' round trip for one tensor, bit for bit).

bitsandbytes runs 4-bit on CUDA and, since 0.46.1, on the CPU; transformers then loads with
``device_map="cpu"`` (a GPU index fails there).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

if TYPE_CHECKING:
    import torch

#: The oldest bitsandbytes whose CPU backend transformers 5.23 accepts for 4-bit.
MIN_CPU_BITSANDBYTES = Version("0.46.1")
#: The block size transformers' bitsandbytes integration quantizes 4-bit weights with (``Params4bit``'s default).
BLOCKSIZE = 64


def default_compute_dtype() -> str:
    """bf16 on CUDA; fp32 on the CPU, where bitsandbytes' bf16 compute is slower and moves the logits more."""
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass(frozen=True)
class QuantSpec:
    """How the base weights of a run were quantized: what verify loads and export reproduces."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    blocksize: int = BLOCKSIZE
    load_dtype: str = "float32"  # the dtype of the weights when bitsandbytes quantized them
    library: str = ""  # "bitsandbytes X.Y.Z"
    quantize_experts: bool = True  # MoE: hold the 3-D expert stacks in 4 bits too (bitsandbytes' parametrization)
    modules: tuple[str, ...] = field(default=(), compare=False)  # the modules bitsandbytes replaced (model names)
    experts: tuple[str, ...] = field(default=(), compare=False)  # the expert parameters held in 4 bits (model names)

    def bnb_config(self) -> Any:
        """The transformers ``BitsAndBytesConfig`` that loads the base this way."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype))

    def bnb_kwargs(self) -> dict[str, Any]:
        """``BitsAndBytesConfig`` keywords as plain JSON (what a process without gemma4-tune is handed)."""
        return {"load_in_4bit": True, "bnb_4bit_quant_type": self.quant_type,
                "bnb_4bit_use_double_quant": self.double_quant, "bnb_4bit_compute_dtype": self.compute_dtype}

    def describe(self) -> str:
        """``4-bit nf4 (double quant, blocks of 64, fp32 compute)`` for messages and reports."""
        return (f"4-bit {self.quant_type} ({'double quant, ' if self.double_quant else ''}blocks of {self.blocksize}, "
                f"{self.compute_dtype} compute, {'MoE experts too, ' if self.experts else ''}"
                f"{self.library or 'bitsandbytes'})")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``quantization`` section."""
        data = asdict(self)
        data["modules"], data["experts"] = list(self.modules), list(self.experts)
        data["method"] = "bitsandbytes-4bit"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Read a manifest's ``quantization`` section (unknown keys are not ours to guess: refused)."""
        data = {k: v for k, v in data.items() if k != "method"}
        data["modules"], data["experts"] = tuple(data.get("modules", ())), tuple(data.get("experts", ()))
        return cls(**data)


def bitsandbytes_version() -> Version | None:
    """The installed bitsandbytes, or None."""
    try:
        return Version(importlib.metadata.version("bitsandbytes"))
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable_reason() -> str | None:
    """Why 4-bit cannot run here (in the user's terms), or None when it can."""
    import torch

    version = bitsandbytes_version()
    if version is None:
        return "bitsandbytes is not installed"
    if not torch.cuda.is_available() and version < MIN_CPU_BITSANDBYTES:
        return f"bitsandbytes {version} has no CPU backend (>= {MIN_CPU_BITSANDBYTES} runs 4-bit on the CPU)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means it cannot run; its words are the reason
        return f"bitsandbytes {version} does not import: {type(exc).__name__}: {exc}"
    return None


def device_map() -> Any:
    """Where transformers puts a 4-bit model: this process's GPU (LOCAL_RANK under a launcher), else the CPU."""
    import torch

    from gemma4_tune.ranks import local_gpu

    return {"": local_gpu()} if torch.cuda.is_available() else "cpu"


def load_quantized(path: str, spec: QuantSpec, dtype: torch.dtype) -> Any:
    """The model of ``path`` with its ``nn.Linear`` weights in 4 bits as ``spec`` says (stock transformers), computing
    with the same kernel in training and in evaluation (``patches.keep_4bit_weights_unpacked``)."""
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.model.patches import keep_4bit_weights_unpacked

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, quantization_config=spec.bnb_config(),
                                                        device_map=device_map())
    keep_4bit_weights_unpacked(model)
    return model


def quantized_modules(model: Any) -> tuple[str, ...]:
    """The names of the modules of a loaded base model (before LoRA) that bitsandbytes holds in 4 bits."""
    import bitsandbytes as bnb

    return tuple(sorted(name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)))


def spec_of(model: Any, spec: QuantSpec) -> QuantSpec:
    """``spec`` completed from the loaded base model (before LoRA): the modules bitsandbytes replaced and the library version."""
    return replace(spec, modules=quantized_modules(model), library=f"bitsandbytes {bitsandbytes_version()}")


def dequantized(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` as the 4-bit model computes with it: quantized and dequantized by bitsandbytes exactly as
    loading did (the same dtype, block size, type and double quantization), in ``spec.load_dtype``."""
    import bitsandbytes.functional as bnbf
    import torch

    data = weight.to(getattr(torch, spec.load_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(data, blocksize=spec.blocksize, compress_statistics=spec.double_quant,
                                       quant_type=spec.quant_type)
    return bnbf.dequantize_4bit(packed, state).view(weight.shape)


def base_weights_line(quant: QuantSpec | None) -> dict[str, str]:
    """The report's line on a QLoRA run's base: how it was quantized, and that exports reproduce that model."""
    if quant is None:
        return {}
    experts = f" and {len(quant.experts)} expert stacks" if quant.experts else ""
    return {"base weights": f"{quant.describe()}, {len(quant.modules)} layers{experts}; the model trained is this "
                            "4-bit base + the adapter (export merges into these weights, verify compares with them)"}


__all__ = ["BLOCKSIZE", "MIN_CPU_BITSANDBYTES", "QuantSpec", "base_weights_line", "bitsandbytes_version",
           "default_compute_dtype", "dequantized", "device_map", "load_quantized", "quantized_modules", "spec_of",
           "unavailable_reason"]
