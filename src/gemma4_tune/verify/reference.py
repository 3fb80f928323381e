"""The reference every engine comparison is made against: the model as trained, base + adapter in stock PEFT.

The base is loaded as it was in training: fp32 unless told, and in 4 bits, exactly as the adapter's manifest
records, for a QLoRA adapter (:func:`trained_quantization`, failure-catalog row 38).

This module is the one place that loads the trained model for a comparison (:func:`load_tuned`:
``PeftModel.from_pretrained`` on a fresh base) and computes its outputs, each with the adapter and
with it disabled (``disable_adapter()``, :func:`with_and_without`):

- :func:`token_logits`: every position's logits of token-id prompts, one batch per prompt (llama.cpp);
- :func:`logits_by_modality`: the logits of the processed verification batches (``verify.prompts``),
  per modality (stock parity, llama.cpp media);
- :func:`hf_reference`: greedy generation and log-softmax rows, what vLLM's logprobs are compared with
  (vLLM adapter and merged runs, ``serve --smoke``).

Image tokens attend as the model's config says (``use_bidirectional_attention="vision"``:
bidirectionally within each image on 26B-A4B and 31B, causally on E2B/E4B); ``flip_image_attention``
computes the other semantics, which tells an engine that masks image tokens differently from one
that is simply wrong (failure-catalog row 31). The stock engines of ``verify --engine peft,transformers``
are not this reference: they are artefacts under test, run in a process that never imports gemma4-tune.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gemma4_tune.model.quantization import QuantSpec


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


def trained_quantization(adapter: str | Path | None) -> QuantSpec | None:
    """How the base was quantized when ``adapter`` was trained (QLoRA), from its manifest; None for LoRA."""
    from gemma4_tune.export.manifest import manifest_quantization

    return manifest_quantization(adapter) if adapter is not None else None


def load_tuned(base: str | Path, adapter: str | Path | None, dtype: str = "float32", *,
               as_trained: bool = True) -> Any:
    """The model as trained, in eval mode: the base (a checkpoint directory) with the adapter in stock PEFT (or the
    model alone). A QLoRA adapter's base is loaded in 4 bits exactly as its manifest records (row 38): that, not
    the full-precision base, is what the adapter was trained with; ``as_trained=False`` loads the full-precision
    base instead (what an engine serving the adapter on the original weights computes)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.model.patches import use_model_image_masks
    from gemma4_tune.model.quantization import load_quantized

    quant = trained_quantization(adapter) if as_trained else None
    if quant is not None:
        model = load_quantized(str(base), quant, getattr(torch, quant.load_dtype))
    else:
        model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=getattr(torch, dtype))
    use_model_image_masks(model)
    if adapter is None:
        return model.eval()
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(adapter)).eval()
    if quant is not None and quant.experts:  # the MoE experts were held in 4 bits too, after LoRA as in training
        from gemma4_tune.export.manifest import ADAPTER_DOES_NOT_FIT
        from gemma4_tune.findings import FindingError, finding
        from gemma4_tune.plan.adapters import quantize_experts

        if quantize_experts(tuned, quant).experts != quant.experts:
            raise FindingError(finding(ADAPTER_DOES_NOT_FIT.code, f"{adapter}: the MoE expert stacks its manifest "
                                       f"says were held in 4 bits are not {base}'s", "verify against the base the "
                                       "adapter was trained on"))
    return tuned


def with_and_without(model: Any, adapter: Any, compute: Callable[[], Any]) -> dict[str, Any]:
    """``{"tuned": compute(), "base": compute()}``, the second under ``disable_adapter()``, without gradients.

    Without an ``adapter`` (``model`` is a plain model) only ``"base"`` is computed.
    """
    import torch

    out: dict[str, Any] = {}
    with torch.no_grad():
        if adapter is not None:
            out["tuned"] = compute()
        with model.disable_adapter() if adapter is not None else contextlib.nullcontext():
            out["base"] = compute()
    return out


def token_batch(prompt: Sequence[int]) -> dict[str, torch.Tensor]:
    """One token-id prompt as a batch of one, every position attended."""
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def token_logits(model_dir: str | Path, adapter: str | Path | None,
                 prompts: Sequence[Sequence[int]]) -> dict[str, list[np.ndarray]]:
    """``{"tuned": [...], "base": [...]}``: per-prompt logits ``[len, vocab]`` (numpy float32), one batch per
    prompt, of ``model_dir`` + ``adapter`` in PEFT and of ``model_dir`` alone (``"base"`` only without an
    adapter: e.g. a merged checkpoint)."""
    model = load_tuned(model_dir, adapter)
    return with_and_without(model, adapter, lambda: [model(**token_batch(p)).logits[0].float().numpy()
                                                     for p in prompts])


def logits_by_modality(base: str | Path, adapter: str | Path | None, batches: dict[str, dict[str, Any]], *,
                       flip_image_attention: bool = False, as_trained: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """``{"tuned": {modality: logits}, "base": {modality: logits}}`` (fp32) on each verification batch.

    ``"tuned"`` is left out without an adapter. ``flip_image_attention`` computes both with the
    image-token attention the model does not use (see :func:`image_attention`); ``as_trained``: see
    :func:`load_tuned`.
    """
    model = load_tuned(base, adapter, as_trained=as_trained)
    with image_attention(model, bidirectional_vision(base) != flip_image_attention):
        return with_and_without(model, adapter, lambda: {m: model(**b).logits.float() for m, b in batches.items()})


@dataclass
class RefSequence:
    """One prompt's greedy continuation in transformers + PEFT, with full log-softmax rows.

    ``logprobs[j]`` is the distribution that chose ``token_ids[j]``; ``prompt_logprobs[i]`` the
    one at prompt position ``i`` (predicting prompt token ``i + 1``). Both are float64 lists-of-rows
    (or tensors) of vocabulary width.
    """

    token_ids: list[int]
    logprobs: Any
    prompt_logprobs: Any = None
    prompt_token_ids: list[int] | None = None  # the processed prompt (media placeholders expanded)


#: ``{"base": [RefSequence per prompt], "lora": [...]}`` (``"lora"``: the adapter mode, as vLLM's runner names it)
Reference = dict[str, list[RefSequence]]
ReferenceFn = Callable[..., Reference]


def greedy_rows(model: Any, batch: dict[str, Any], max_tokens: int, banned: Sequence[int]) -> RefSequence:
    """``model``'s greedy continuation of one processed prompt, with the log-softmax of every prompt and
    generated position. ``generate(output_logits=True)`` returns the raw logits (before ``suppress_tokens``
    masks the ``banned`` ids), which is what vLLM's logprobs are computed from."""
    import torch

    n = batch["input_ids"].shape[1]
    prompt_rows = torch.log_softmax(model(**batch).logits[0].double(), -1)
    out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                         suppress_tokens=list(banned) or None, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.config.get_text_config().pad_token_id, eos_token_id=None,
                         temperature=None, top_p=None, top_k=None)
    rows = torch.log_softmax(torch.stack([step[0] for step in out.logits]).double(), -1)
    return RefSequence(token_ids=out.sequences[0, n:].tolist(), logprobs=rows, prompt_logprobs=prompt_rows[:-1],
                       prompt_token_ids=batch["input_ids"][0].tolist())


def hf_reference(base_dir: str | Path, adapter_dir: str | Path | None, prompts: Sequence[Any], *,
                 max_tokens: int = 8, banned: Sequence[int] = (), dtype: str = "float32",
                 flip_image_attention: bool = False) -> Reference:
    """Greedy generation and log-softmax rows (:func:`greedy_rows`) from stock transformers + PEFT, without
    and with the adapter: ``{"lora": [...], "base": [...]}`` (only ``"base"`` without ``adapter_dir``).

    ``prompts`` are token-id lists or ``verify.prompts.VerifyPrompt`` objects (processed with the
    model's processor, media included). ``flip_image_attention``: image tokens attend the way the
    model does not (:func:`image_attention`).
    """
    from gemma4_tune.verify.prompts import VerifyPrompt, processed

    model = load_tuned(base_dir, adapter_dir, dtype)
    processor = None
    if any(isinstance(p, VerifyPrompt) for p in prompts):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(base_dir))
    batches = [processed(processor, [p]) if isinstance(p, VerifyPrompt) else token_batch(p) for p in prompts]
    with image_attention(model, bidirectional_vision(base_dir) != flip_image_attention):
        out = with_and_without(model, adapter_dir, lambda: [greedy_rows(model, b, max_tokens, banned)
                                                            for b in batches])
    return {"lora": out["tuned"], "base": out["base"]} if adapter_dir is not None else out


__all__ = ["RefSequence", "Reference", "ReferenceFn", "attention_name", "bidirectional_vision", "greedy_rows",
           "hf_reference", "image_attention", "load_tuned", "logits_by_modality", "token_batch", "token_logits",
           "trained_quantization", "with_and_without"]
