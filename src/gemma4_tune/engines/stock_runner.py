"""Load artefacts the way a user without gemma4-tune does, and write their logits.

Standalone: it never imports gemma4_tune (run it with ``python -P`` so this folder is not
on sys.path), and it refuses to compare anything (exit 3) when gemma4_tune, or a tool known to patch
transformers or PEFT (Unsloth, Axolotl), is imported in its process: its verdict is what a user with only
transformers and PEFT gets. Usage: stock_runner.py REQUEST.json, where the request names the base model,
an optional adapter and merged checkpoint, optionally the 4-bit settings a QLoRA adapter's base was loaded with
(``quantization``: ``BitsAndBytesConfig`` keywords, applied to the base only), a batch file (torch.save of ``{modality: batch}``, each batch a
dict of tensors) and the output file. Output (torch.save): ``{artefact: {modality: logits}}``.
"""

import json
import sys

import torch
from transformers import AutoModelForImageTextToText

FOREIGN = ("gemma4_tune", "unsloth", "unsloth_zoo", "axolotl")


def foreign_modules() -> list[str]:
    """Imported packages that are not stock transformers/PEFT but change how they load or run models."""
    return sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in FOREIGN})


def refuse_if_foreign(when: str) -> None:
    """Exit 3 (nothing compared) when a foreign package is in this process."""
    found = foreign_modules()
    if found:
        sys.stderr.write(f"stock runner: {', '.join(found)} imported {when}; a stock comparison needs a process "
                         "with only transformers and PEFT\n")
        raise SystemExit(3)


def with_model_image_masks(model, batch: dict) -> dict:
    """The batch with the 12B's image masks as its class builds them (its own ``create_masks_for_generate``,
    as generate() with a static cache uses): transformers 5.23's plain forward builds other ones (row 31)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config.model_type != "gemma4_unified" or "mm_token_type_ids" not in batch:
        return batch
    ids = batch["input_ids"]
    embeds = torch.empty((*ids.shape, 0), dtype=base.dtype)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    masks = type(base).create_masks_for_generate(base.config, embeds, batch.get("attention_mask"), None, positions,
                                                 mm_token_type_ids=batch["mm_token_type_ids"])
    return {**batch, "attention_mask": masks}


def quantized(settings: dict | None) -> dict:
    """``from_pretrained`` keywords that load the base in 4 bits as a QLoRA adapter was trained (bitsandbytes'
    settings as ``BitsAndBytesConfig`` keywords); none for a full-precision base."""
    if not settings:
        return {}
    from transformers import BitsAndBytesConfig

    settings = {**settings, "bnb_4bit_compute_dtype": getattr(torch, settings["bnb_4bit_compute_dtype"])}
    return {"quantization_config": BitsAndBytesConfig(**settings),
            "device_map": {"": 0} if torch.cuda.is_available() else "cpu"}


def unpacked(model) -> None:
    """bitsandbytes 0.50's AVX512-BF16 CPU path repacks a 4-bit weight in place at its first no-grad forward and
    asserts on its shape: the base computes as the adapter was trained, with the plain 4-bit kernel (gemma4-tune's
    model/patches.py says why; this script may not import it)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_experts(model, settings: dict | None, experts: list[str], blocksize: int) -> None:
    """The MoE expert stacks a QLoRA run held in 4 bits, held so again with bitsandbytes' own parametrization, after
    LoRA as in training (the names are the base model's; PEFT's wrappers are looked through)."""
    if not experts:
        return
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    wanted = set(experts)
    for name, module in model.named_modules():
        if not isinstance(module, Gemma4TextExperts):
            continue
        plain = ".".join(p for p in name.removeprefix("base_model.model.").split(".") if p != "base_layer")
        for param in ("gate_up_proj", "down_proj"):
            if f"{plain}.{param}" in wanted:
                replace_parameter_4bit(module, param, quant_type=settings["bnb_4bit_quant_type"],
                                       compress_statistics=settings["bnb_4bit_use_double_quant"], blocksize=blocksize)
                wanted.discard(f"{plain}.{param}")
    if wanted:
        raise SystemExit(f"stock runner: the base has no expert parameter {sorted(wanted)[0]}")


def main() -> None:
    refuse_if_foreign("before loading")
    request = json.loads(open(sys.argv[1]).read())
    batches = torch.load(request["batch"])
    dtype = getattr(torch, request.get("dtype", "float32"))
    out = {}

    def run(model):
        return {modality: model(**with_model_image_masks(model, batch)).logits.float()
                for modality, batch in batches.items()}

    with torch.no_grad():
        base = AutoModelForImageTextToText.from_pretrained(request["base"], dtype=dtype,
                                                           **quantized(request.get("quantization"))).eval()
        unpacked(base)
        out["base"] = run(base)
        if request.get("adapter"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, request["adapter"]).eval()
            quantize_experts(model, request.get("quantization"), request.get("experts") or [],
                             request.get("blocksize"))
            out["peft"] = run(model)
            del model
        if request.get("merged"):
            merged, info = AutoModelForImageTextToText.from_pretrained(request["merged"], dtype=dtype,
                                                                       output_loading_info=True)
            out["transformers"] = run(merged.eval())
            out["merged_loading_info"] = {k: sorted(map(str, v)) for k, v in info.items()}
    refuse_if_foreign("while loading")
    out["foreign_modules"] = foreign_modules()
    torch.save(out, request["out"])


if __name__ == "__main__":
    main()
