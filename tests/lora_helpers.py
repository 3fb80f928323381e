"""Adapters made without training, through the toolkit's own path, for the engine tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def random_lora(base: Path, out: Path, seed: int, spec: str = "text") -> Path:
    """A rank-8 LoRA on ``spec`` with random A and B (so it changes the output), saved by the toolkit."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    model, plan = prepare_model(AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32),
                                spec, LoraSettings(rank=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_adapter(model, out, plan=plan)


def random_lora_model(base: Path, spec: str, seed: int = 0, scale: float = 0.1) -> "torch.nn.Module":
    """The fp32 base with a rank-8 LoRA on ``spec`` (the toolkit's plan) whose lora_B are random, in memory."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model

    model, _ = prepare_model(AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32), spec,
                             LoraSettings(rank=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def zeroed_lora_b(adapter: Path, out: Path) -> Path:
    """The same adapter with every lora_B set to zero: converts and loads everywhere, changes nothing (row 4)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    tensors = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def unwrap_clippable(model: "torch.nn.Module") -> int:
    """The popular "unwrap" fix (catalog row 2), for making the wrong artefacts and baselines it produces:
    replace every ``Gemma4ClippableLinear`` by its inner ``nn.Linear`` (in place, clamps gone); return how many."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Gemma4ClippableLinear)]
    for name, module in found:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.linear)
    return len(found)


def full_logits_sums(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """The reference the chunked loss must equal: summed cross-entropy, count and greedy hits from full logits
    (position t predicts labels[t + 1]; -100 counts nowhere)."""
    import torch
    from torch.nn import functional as F

    logits = logits[:, :-1, :]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or float64 for a float64 model
    target = labels[:, 1:].to(logits.device)
    keep = target.ne(-100)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, keep.sum(), (logits.argmax(-1).eq(target) & keep).sum()
