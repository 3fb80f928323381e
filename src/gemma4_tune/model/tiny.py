"""Tiny random-weight Gemma 4 models that keep an official variant's structure.

The published config of a catalog variant is shrunk in width and depth, never in
kind: every feature flag (KV sharing with sliding and full producer layers,
per-layer embeddings, double-wide MLP, K=V global layers, MoE experts,
bidirectional vision attention, clipped tower linears, audio tower; the 12B's
encoder-free embedders of raw patches and audio frames) and the sliding/full
layer pattern survive in miniature. The directory written is a
normal Hugging Face model directory (config, safetensors, tokenizer, processor,
chat template) that stock transformers and vLLM load.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from gemma4_tune.model.catalog import Variant
from gemma4_tune.model.profile import FAMILIES
from gemma4_tune.model.tokenizer import MEDIA_TOKENS, VIDEO_TOKEN, save_tokenizer

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # vLLM's CPU attention supports head sizes 32..512
    "global_head_dim": 64,
    "sliding_window": 32,
    "max_position_embeddings": 4096,
    "hidden_size_per_layer_input": 16,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "position_embedding_size": 1024,
}
TINY_AUDIO = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "output_proj_dims": 48,
}
TINY_INIT_STD = 0.1
# Smallest image budget the Gemma 4 image processor accepts (soft tokens per image).
TINY_IMAGE_SOFT_TOKENS = 70
# The audio sub-sampler derives its projection width from channels[0] == mel bins.
AUDIO_MEL_BINS = 128
TINY_AUDIO_CONV_CHANNELS = [AUDIO_MEL_BINS, 8]
# Sliding layers kept per sliding/full period, and periods kept (one more for KV-shared layers).
TINY_SLIDING_PER_PERIOD = 2


def miniature_layer_types(layer_types: list[str], num_kv_shared_layers: int) -> tuple[list[str], int]:
    """Shrink the sliding/full pattern: 2 sliding + 1 full per period, one period per phase.

    A checkpoint with KV sharing gets one producer period (so both a sliding and a full
    layer store K/V) followed by one consumer period; otherwise two periods.
    """
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        period = ["full_attention"]
    else:
        period = ["sliding_attention"] * TINY_SLIDING_PER_PERIOD + ["full_attention"]
    tiny = period * 2
    shared = len(period) if num_kv_shared_layers else 0
    return tiny, shared


def tiny_config(variant: Variant, vocab_size: int, token_ids: dict[str, int],
                dtype: str = "float32") -> dict[str, Any]:
    """The variant's published config, shrunk; token ids remapped to the tiny tokenizer.

    Weights are stored in ``dtype``: float32 by default so that parity checks on tiny models
    can be exact (official checkpoints are bfloat16; pass that to mirror them).
    """
    cfg = copy.deepcopy(variant.config)
    for section in (cfg, *(cfg.get(k) or {} for k in ("text_config", "vision_config", "audio_config"))):
        if "dtype" in section:
            section["dtype"] = dtype
    text = cfg["text_config"]
    layer_types, shared = miniature_layer_types(text["layer_types"], text.get("num_kv_shared_layers", 0))
    for key, value in TINY_TEXT.items():
        if key == "hidden_size_per_layer_input" and not text.get(key):
            continue
        if key in ("num_experts", "top_k_experts", "moe_intermediate_size") and not text.get("enable_moe_block"):
            continue
        if key == "global_head_dim" and "global_head_dim" not in text:
            continue
        text[key] = value
    if text.get("num_global_key_value_heads"):
        text["num_global_key_value_heads"] = 1
    text.update(
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_kv_shared_layers=shared,
        vocab_size=vocab_size,
        pad_token_id=token_ids["<pad>"],
        eos_token_id=token_ids["<eos>"],
        bos_token_id=token_ids["<bos>"],
    )
    if text.get("hidden_size_per_layer_input"):
        text["vocab_size_per_layer_input"] = vocab_size
    unified = cfg["model_type"] == "gemma4_unified"
    if cfg.get("vision_config") and unified:
        # the patch embedder's width is the text width, as published (mm_embed_dim == output_proj_dims == hidden)
        cfg["vision_config"].update(mm_embed_dim=text["hidden_size"], output_proj_dims=text["hidden_size"],
                                    num_soft_tokens=TINY_IMAGE_SOFT_TOKENS)
    elif cfg.get("vision_config"):
        cfg["vision_config"].update(TINY_VISION)
        cfg["vision_config"]["default_output_length"] = TINY_IMAGE_SOFT_TOKENS
    if cfg.get("audio_config") and not unified:
        cfg["audio_config"].update(TINY_AUDIO, subsampling_conv_channels=TINY_AUDIO_CONV_CHANNELS)
    cfg.update(
        image_token_id=token_ids[MEDIA_TOKENS["image_token"]],
        boi_token_id=token_ids[MEDIA_TOKENS["boi_token"]],
        eoi_token_id=token_ids[MEDIA_TOKENS["eoi_token"]],
        audio_token_id=token_ids[MEDIA_TOKENS["audio_token"]],
        boa_token_id=token_ids[MEDIA_TOKENS["boa_token"]],
        eoa_token_index=token_ids[MEDIA_TOKENS["eoa_token"]],
        video_token_id=token_ids[VIDEO_TOKEN],
    )
    if "eoa_token_id" in cfg:
        cfg["eoa_token_id"] = token_ids[MEDIA_TOKENS["eoa_token"]]
    # As the -it checkpoints: generation stops at <eos> or at the end of the model's turn.
    cfg["eos_token_id"] = [token_ids["<eos>"], token_ids["<turn|>"]]
    # Wider random init than the published 0.02: with hidden size 64 and a tied, frozen lm_head,
    # 0.02 caps every logit near 1, so no fine-tune of a tiny model could show its loss falling.
    cfg["initializer_range"] = text["initializer_range"] = TINY_INIT_STD
    cfg["architectures"] = [FAMILIES[cfg["model_type"]].model_class]
    cfg.pop("transformers_version", None)
    cfg.pop("quantization_config", None)
    return cfg


def _calibrate_clamps(model: Any, generator: Any) -> None:
    """Give every clipped tower linear finite bounds that bite (80% of the observed range).

    Official checkpoints ship finite clamp bounds; random init leaves them at +-inf,
    which would make tests blind to a fix that drops the clamps (failure-catalog row 2).
    """
    import torch
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    observed: dict[str, list[float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Gemma4ClippableLinear) and module.use_clipped_linears:

            def hook(mod: Any, args: tuple, out: Any, name: str = name) -> None:
                x = args[0]
                observed[name] = [float(x.min()), float(x.max()), float(out.min()), float(out.max())]

            hooks.append(module.linear.register_forward_hook(hook))
    if not hooks:
        return
    config = model.config
    with torch.no_grad():
        if config.vision_config is not None:
            vc = config.vision_config
            side = int(math.sqrt(TINY_IMAGE_SOFT_TOKENS)) * vc.pooling_kernel_size
            n = side * side
            pixels = torch.rand((1, n, 3 * vc.patch_size**2), generator=generator)
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0)
            model.model.vision_tower(pixel_values=pixels, pixel_position_ids=positions)
        if config.audio_config is not None:
            feats = torch.randn((1, 200, AUDIO_MEL_BINS), generator=generator)
            mask = torch.ones((1, 200), dtype=torch.bool)
            model.model.audio_tower(feats, mask)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    for name, (in_lo, in_hi, out_lo, out_hi) in observed.items():
        mod = modules[name]
        mod.input_min.fill_(0.8 * in_lo)
        mod.input_max.fill_(0.8 * in_hi)
        mod.output_min.fill_(0.8 * out_lo)
        mod.output_max.fill_(0.8 * out_hi)


def _processor_files(out_dir: Path, cfg: dict[str, Any], chat_template: str) -> None:
    """Write the model's full processor (image, video and audio parts) beside the tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    vision = cfg.get("vision_config") or {}
    patch = vision.get("patch_size", 16)
    pool = vision.get("pooling_kernel_size", 3)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    unified = cfg["model_type"] == "gemma4_unified"
    prefix = "Gemma4Unified" if unified else "Gemma4"
    # the 12B takes raw audio frames (audio_embed_dim samples each); the towers take mel features
    audio = (transformers.Gemma4UnifiedAudioFeatureExtractor(
                 feature_size=cfg["audio_config"]["audio_embed_dim"],
                 audio_samples_per_token=cfg["audio_config"]["audio_embed_dim"])
             if unified else transformers.Gemma4AudioFeatureExtractor(feature_size=AUDIO_MEL_BINS))
    processor = getattr(transformers, FAMILIES[cfg["model_type"]].processor_class)(
        feature_extractor=audio,
        image_processor=getattr(transformers, f"{prefix}ImageProcessor")(
            patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=TINY_IMAGE_SOFT_TOKENS
        ),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, f"{prefix}VideoProcessor")(
            patch_size=patch, pooling_kernel_size=pool, max_soft_tokens=TINY_IMAGE_SOFT_TOKENS, num_frames=2
        ),
        chat_template=chat_template,
        image_seq_length=TINY_IMAGE_SOFT_TOKENS,
    )
    processor.save_pretrained(str(out_dir))


def build_tiny_model(variant: Variant, out_dir: Path, *, seed: int = 0, chat_template: str,
                     dtype: str = "float32") -> dict[str, Any]:
    """Write a tiny random model of ``variant`` into ``out_dir``; return its config dict.

    ``out_dir`` must not exist or be empty; the caller writes through a temporary
    directory and moves it into place.
    """
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = save_tokenizer(out_dir, chat_template)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(out_dir)))
    cfg_dict = tiny_config(variant, vocab_size, token_ids, dtype)
    family = FAMILIES[cfg_dict["model_type"]]
    config = family.transformers_class("config")(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = cfg_dict["architectures"]
    torch.manual_seed(seed)
    model = family.transformers_class()(config).eval()
    generator = torch.Generator().manual_seed(seed)
    _calibrate_clamps(model, generator)
    model.generation_config.eos_token_id = cfg_dict["eos_token_id"]
    model.generation_config.pad_token_id = token_ids["<pad>"]
    model.generation_config.bos_token_id = token_ids["<bos>"]
    model.save_pretrained(str(out_dir))
    _add_kv_shared_keys(out_dir / "model.safetensors", model, generator)
    _add_vllm_fields(out_dir / "config.json", cfg_dict)
    _processor_files(out_dir, cfg_dict, chat_template)
    (out_dir / "gemma4_tune_tiny.json").write_text(
        json.dumps({"variant": variant.id, "seed": seed, "tiny": True}, indent=2) + "\n"
    )
    return cfg_dict


def kv_shared_keys(text: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the k/v projections and k_norm that official E2B/E4B checkpoints store for
    KV-shared layers (``text``: a ``Gemma4TextConfig``).

    transformers >= 5.5.2 builds no such modules and ``save_pretrained`` omits them, but the
    published files carry them and engines expect them (failure-catalog row 7).
    """
    out: dict[str, tuple[int, ...]] = {}
    for i, mode in enumerate(text.kv_sharing_modes):
        if mode != "reuse":
            continue
        per_layer = text.per_layer_config[i]
        kv_out = per_layer.num_key_value_heads * per_layer.head_dim
        prefix = f"model.language_model.layers.{i}.self_attn"
        out[f"{prefix}.k_proj.weight"] = (kv_out, text.hidden_size)
        if not (text.attention_k_eq_v and text.layer_types[i] == "full_attention"):
            out[f"{prefix}.v_proj.weight"] = (kv_out, text.hidden_size)
        out[f"{prefix}.k_norm.weight"] = (per_layer.head_dim,)
    return out


def _add_kv_shared_keys(weights: Path, model: Any, generator: Any) -> None:
    """Store the KV-shared layers' keys (:func:`kv_shared_keys`) in the saved checkpoint, as official ones do."""
    import torch
    from safetensors.torch import load_file, save_file

    text = model.config.text_config
    std = text.initializer_range
    extra = {name: (torch.ones(shape) if name.endswith("k_norm.weight")
                    else torch.randn(shape, generator=generator) * std)
             for name, shape in kv_shared_keys(text).items()}
    if extra:
        tensors = load_file(str(weights))
        dtype = tensors[next(iter(tensors))].dtype  # the checkpoint's dtype (bf16, as published)
        save_file({**tensors, **{k: v.to(dtype) for k, v in extra.items()}}, str(weights), metadata={"format": "pt"})


#: The field vLLM reads an image's soft-token budget from, by family; transformers drops it on save.
VLLM_SOFT_TOKENS_FIELD = {"gemma4": "default_output_length", "gemma4_unified": "num_soft_tokens"}


def _add_vllm_fields(config_path: Path, cfg_dict: dict[str, Any]) -> None:
    """Put back the image soft-token budget vLLM reads from ``vision_config`` (see VLLM_SOFT_TOKENS_FIELD)."""
    saved = json.loads(config_path.read_text())
    key = VLLM_SOFT_TOKENS_FIELD[cfg_dict["model_type"]]
    if saved.get("vision_config") and cfg_dict.get("vision_config"):
        saved["vision_config"][key] = cfg_dict["vision_config"][key]
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
