"""Memory estimates from the real module tree (meta device), per tower and dtype.

bitsandbytes' loading quantizes ``nn.Linear`` weights only: the MoE experts are 3-D parameters and would stay
in bf16, which is why plain QLoRA barely shrinks the 26B-A4B (failure-catalog row 18). gemma4-tune holds them in
4 bits too (``plan.adapters.quantize_experts``, unless ``--no-quantize-experts``); the estimate gives both figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

BF16 = 2.0
# NF4 with double quantization: 4 bits per weight plus ~0.127 bits of block constants.
NF4 = (4 + 0.127) / 8
GIB = 1024**3


@dataclass
class WeightMemory:
    """Bytes of the frozen base weights, split by how they are stored."""

    quantize: str | None
    quantized_bytes: float
    bf16_bytes: float
    experts_bf16_bytes: float  # the MoE expert stacks in bf16
    experts_4bit_bytes: float = 0.0  # the same stacks in 4 bits
    experts_quantized: bool = False  # whether the run holds them in 4 bits

    @property
    def experts_bytes(self) -> float:
        """The expert stacks as the run stores them."""
        return self.experts_4bit_bytes if self.experts_quantized else self.experts_bf16_bytes

    @property
    def total_bytes(self) -> float:
        """All weights."""
        return self.quantized_bytes + self.bf16_bytes + self.experts_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, in GiB."""
        return {
            "quantize": self.quantize,
            "total_gib": round(self.total_bytes / GIB, 3),
            "quantized_gib": round(self.quantized_bytes / GIB, 3),
            "bf16_gib": round(self.bf16_bytes / GIB, 3),
            "experts_bf16_gib": round(self.experts_bf16_bytes / GIB, 3),
            "experts_4bit_gib": round(self.experts_4bit_bytes / GIB, 3),
            "experts_quantized": self.experts_quantized,
            "total_gib_experts_bf16": round((self.total_bytes - self.experts_bytes + self.experts_bf16_bytes) / GIB, 3),
        }

    def summary(self) -> str:
        """One line for people."""
        text = f"base weights ~{_size(self.total_bytes)} in bf16" if not self.quantize else \
            f"base weights ~{_size(self.total_bytes)} with {self.quantize} ({_size(self.quantized_bytes)} " \
            f"quantized, {_size(self.bf16_bytes)} bf16 embeddings/norms"
        if self.quantize:
            if self.experts_quantized:
                without = self.total_bytes - self.experts_bytes + self.experts_bf16_bytes
                text += (f", {_size(self.experts_4bit_bytes)} MoE experts in 4 bits too; ~{_size(without)} with "
                         f"the experts left in bf16 as bitsandbytes' loading leaves them")
            elif self.experts_bf16_bytes:
                text += f", {_size(self.experts_bf16_bytes)} MoE experts that bitsandbytes leaves in bf16"
            text += ")"
        elif self.experts_bf16_bytes:
            text += f" (MoE experts {_size(self.experts_bf16_bytes)}; in 4 bits {_size(self.experts_4bit_bytes)})"
        return text


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def weight_memory(model: nn.Module, quantize: str | None = None, quantize_experts: bool = True) -> WeightMemory:
    """Estimate base-weight memory for ``model`` (any device, meta included); with ``quantize`` the MoE experts
    in 4 bits too unless ``quantize_experts`` is False."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    expert_params = {id(p) for m in model.modules() if isinstance(m, Gemma4TextExperts) for p in m.parameters()}
    lm_head = getattr(model, "lm_head", None)
    skip = {id(lm_head.weight)} if isinstance(lm_head, nn.Linear) else set()
    quantized = bf16 = experts = 0.0
    for param in {id(p): p for p in model.parameters()}.values():
        n = param.numel()
        if id(param) in expert_params:
            experts += n
        elif quantize == "4bit" and id(param) in linear_weights and id(param) not in skip:
            quantized += n * NF4
        else:
            bf16 += n * BF16
    four_bit = quantize == "4bit"
    return WeightMemory(quantize if four_bit else None, quantized, bf16, experts * BF16, experts * NF4,
                        four_bit and quantize_experts and experts > 0)
