"""The reference every multimodal comparison is made against: base + adapter in stock PEFT, fp32.

``logits_by_modality`` runs the verification batches (``verify.prompts``) through the base model
with the adapter (``PeftModel.from_pretrained``) and with it disabled, in this process. Image
tokens attend as the model's config says (``use_bidirectional_attention="vision"``: bidirectionally
within each image on 26B-A4B and 31B, causally on E2B/E4B); ``flip_image_attention`` computes the
other semantics, which tells an engine that masks image tokens differently from one that is
simply wrong (failure-catalog row 31).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def bidirectional_vision(model_dir: str | Path) -> bool:
    """Whether the model's image tokens attend to each other bidirectionally (its config says so)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("text_config") or config).get("use_bidirectional_attention") == "vision"


def attention_name(bidirectional: bool) -> str:
    """``bidirectional`` or ``causal``, as reports name image-token attention."""
    return "bidirectional" if bidirectional else "causal"


@contextlib.contextmanager
def image_attention(model: Any, bidirectional: bool) -> Iterator[None]:
    """Run ``model`` with image tokens attending ``bidirectional``-ly or causally, whatever its config says.

    transformers reads ``text_config.use_bidirectional_attention`` at every forward (and needs
    ``mm_token_type_ids`` in the batch for the bidirectional blocks), so setting it is the switch.
    """
    config = model.config.get_text_config()
    old = config.use_bidirectional_attention
    config.use_bidirectional_attention = "vision" if bidirectional else None
    try:
        yield
    finally:
        config.use_bidirectional_attention = old


def load_tuned(base: str | Path, adapter: str | Path | None, dtype: torch.dtype = torch.float32) -> Any:
    """The base model with the adapter in stock PEFT (or the base alone), in eval mode."""
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.model.patches import use_model_image_masks

    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=dtype)
    use_model_image_masks(model)
    if adapter is None:
        return model.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter)).eval()


def logits_by_modality(base: str | Path, adapter: str | Path | None, batches: dict[str, dict[str, Any]], *,
                       flip_image_attention: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{"tuned": {modality: logits}, "base": {modality: logits}}`` (fp32) on each verification batch.

    ``"tuned"`` is left out without an adapter. ``flip_image_attention`` computes both with the
    image-token attention the model does not use (see :func:`image_attention`).
    """
    model = load_tuned(base, adapter)
    bidirectional = bidirectional_vision(base) != flip_image_attention
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad(), image_attention(model, bidirectional):
        if adapter is not None:
            out["tuned"] = {m: model(**b).logits.float() for m, b in batches.items()}
        with model.disable_adapter() if adapter is not None else contextlib.nullcontext():
            out["base"] = {m: model(**b).logits.float() for m, b in batches.items()}
    return out


__all__ = ["attention_name", "bidirectional_vision", "image_attention", "load_tuned", "logits_by_modality"]
