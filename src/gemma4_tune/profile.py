"""ModelProfile: what a Gemma 4 checkpoint is, read from its config and module types.

Every check and plan asks the profile, never the model name. The profile is built
from a config alone (no weights), so it works for catalog entries and for local
directories alike; parameter counts come from instantiating the real transformers
classes on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.catalog import Variant, resolve_variant, variants
from gemma4_tune.findings import MODEL_NOT_FOUND, NOT_GEMMA4, FindingError, finding

TINY_MARKER = "gemma4_tune_tiny.json"


@dataclass(frozen=True)
class LayerFacts:
    """One text decoder layer."""

    index: int
    attention: str  # "sliding" or "full"
    head_dim: int
    num_kv_heads: int
    kv_sharing: str  # "own", "store" (producer read by shared layers), "reuse" (no k/v projections)
    k_eq_v: bool  # global layer whose values reuse the keys: no v_proj
    double_wide_mlp: bool
    moe: bool

    @property
    def attention_projections(self) -> list[str]:
        """The attention projections this layer really has."""
        if self.kv_sharing == "reuse":
            return ["q_proj", "o_proj"]
        if self.k_eq_v:
            return ["q_proj", "k_proj", "o_proj"]
        return ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class TowerFacts:
    """A vision or audio encoder."""

    name: str  # "vision" or "audio"
    module_prefix: str
    num_layers: int
    hidden_size: int
    clipped_linears: bool

    @property
    def layer_class(self) -> str:
        """The transformers class of one encoder layer: the unit FSDP wraps (row 25)."""
        return LAYER_CLASSES[self.name]


#: The repeated block of each part of Gemma 4, by part: what FSDP wraps and shards as one unit.
LAYER_CLASSES = {"text": "Gemma4TextDecoderLayer", "vision": "Gemma4VisionEncoderLayer", "audio": "Gemma4AudioLayer"}


@dataclass
class ModelProfile:
    """Structural facts about one Gemma 4 checkpoint."""

    source: str
    variant: str | None
    tiny: bool
    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_attention_heads: int
    layers: list[LayerFacts]
    towers: list[TowerFacts]
    sliding_window: int
    num_kv_shared_layers: int
    attention_k_eq_v: bool
    use_double_wide_mlp: bool
    bidirectional_attention: str | None
    ple_hidden_size: int
    moe: dict[str, int] | None
    tied_embeddings: bool
    final_logit_softcapping: float | None
    token_ids: dict[str, Any]
    parameters: dict[str, int] = field(default_factory=dict)

    @property
    def text_prefix(self) -> str:
        """Module path of the language model inside ``Gemma4ForConditionalGeneration``."""
        return "model.language_model"

    @property
    def max_head_dim(self) -> int:
        """Largest attention head dimension (global layers): FlashAttention-2 stops at 256."""
        return max(layer.head_dim for layer in self.layers)

    def tower(self, name: str) -> TowerFacts | None:
        """The named tower, if the checkpoint has it."""
        return next((t for t in self.towers if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, *, source: str, variant: str | None = None, tiny: bool = False,
                    count_parameters: bool = True) -> ModelProfile:
        """Build from a ``Gemma4Config`` (or its dict form)."""
        config = _as_config(config, source)
        text = config.text_config
        modes = text.kv_sharing_modes
        layers = []
        for i, layer_type in enumerate(text.layer_types):
            per_layer = text.per_layer_config[i]
            sliding = layer_type == "sliding_attention"
            layers.append(
                LayerFacts(
                    index=i,
                    attention="sliding" if sliding else "full",
                    head_dim=per_layer.head_dim,
                    num_kv_heads=per_layer.num_key_value_heads,
                    kv_sharing={None: "own", "store": "store", "reuse": "reuse"}[modes[i]],
                    k_eq_v=bool(text.attention_k_eq_v and not sliding),
                    double_wide_mlp=bool(text.use_double_wide_mlp and modes[i] == "reuse"),
                    moe=bool(text.enable_moe_block),
                )
            )
        towers = []
        if config.vision_config is not None:
            vc = config.vision_config
            towers.append(TowerFacts("vision", "model.vision_tower", vc.num_hidden_layers, vc.hidden_size,
                                     bool(vc.use_clipped_linears)))
        if config.audio_config is not None:
            ac = config.audio_config
            towers.append(TowerFacts("audio", "model.audio_tower", ac.num_hidden_layers, ac.hidden_size,
                                     bool(ac.use_clipped_linears)))
        moe = None
        if text.enable_moe_block:
            moe = {"num_experts": text.num_experts, "top_k": text.top_k_experts,
                   "intermediate_size": text.moe_intermediate_size}
        token_ids = {
            key: getattr(config, key)
            for key in ("image_token_id", "boi_token_id", "eoi_token_id", "audio_token_id", "boa_token_id",
                        "eoa_token_index", "video_token_id")
            if getattr(config, key, None) is not None
        }
        token_ids.update(pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id,
                         eos_token_id=getattr(config, "eos_token_id", None) or text.eos_token_id)
        profile = cls(
            source=source,
            variant=variant or _match_variant(config),
            tiny=tiny,
            architecture=(getattr(config, "architectures", None) or ["Gemma4ForConditionalGeneration"])[0],
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            num_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            layers=layers,
            towers=towers,
            sliding_window=text.sliding_window,
            num_kv_shared_layers=text.num_kv_shared_layers,
            attention_k_eq_v=bool(text.attention_k_eq_v),
            use_double_wide_mlp=bool(text.use_double_wide_mlp),
            bidirectional_attention=text.use_bidirectional_attention,
            ple_hidden_size=text.hidden_size_per_layer_input or 0,
            moe=moe,
            tied_embeddings=bool(config.tie_word_embeddings),
            final_logit_softcapping=text.final_logit_softcapping,
            token_ids=token_ids,
        )
        if count_parameters:
            profile.parameters = count_parameters_by_part(config)
        return profile

    @classmethod
    def from_pretrained(cls, path: str | Path, *, count_parameters: bool = True) -> ModelProfile:
        """Build from a local model directory (reads config.json only) or a catalog id."""
        p = Path(path)
        if p.is_dir():
            cfg_path = p / "config.json"
            if not cfg_path.is_file():
                raise FindingError(finding(MODEL_NOT_FOUND.code, f"{p} has no config.json",
                                           "point at a Hugging Face model directory (config.json + safetensors)"))
            data = json.loads(cfg_path.read_text())
            tiny_info = json.loads((p / TINY_MARKER).read_text()) if (p / TINY_MARKER).is_file() else {}
            return cls.from_config(data, source=str(p), variant=tiny_info.get("variant"), tiny=bool(tiny_info),
                                   count_parameters=count_parameters)
        if p.exists():
            raise FindingError(finding(MODEL_NOT_FOUND.code, f"{p} is a file, not a model directory",
                                       "point at the directory that holds config.json"))
        variant = resolve_variant(str(path))
        return cls.from_variant(variant, count_parameters=count_parameters)

    @classmethod
    def from_variant(cls, variant: Variant, *, count_parameters: bool = True) -> ModelProfile:
        """Build from a catalog entry's published config."""
        return cls.from_config(variant.config, source=f"catalog:{variant.id}", variant=variant.id,
                               count_parameters=count_parameters)


def _as_config(config: Any, source: str) -> Any:
    from transformers import Gemma4Config

    if isinstance(config, Gemma4Config):
        return config
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if model_type != "gemma4":
            hint = ("a text-only Gemma 4 config (gemma4_text); load the full multimodal checkpoint instead"
                    if model_type == "gemma4_text" else f"model_type is {model_type!r}")
            raise FindingError(finding(NOT_GEMMA4.code, f"{source} is not a Gemma 4 checkpoint ({hint})",
                                       "use a Gemma 4 checkpoint (model_type 'gemma4'), e.g. google/gemma-4-E2B-it"))
        kwargs = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        cfg = Gemma4Config(**kwargs)
        cfg.architectures = config.get("architectures")
        return cfg
    raise FindingError(finding(NOT_GEMMA4.code, f"{source}: unsupported config object {type(config).__name__}",
                               "pass a Gemma4Config or a model directory"))


_STRUCTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_kv_shared_layers", "enable_moe_block",
                   "attention_k_eq_v", "hidden_size_per_layer_input")


def _match_variant(config: Any) -> str | None:
    """The catalog variant with the same text structure, if any."""
    text = config.text_config
    for variant in variants().values():
        published = variant.config["text_config"]
        if all(published.get(k, getattr(text.__class__, k, None)) == getattr(text, k) for k in _STRUCTURE_KEYS):
            return variant.id
    return None


def count_parameters_by_part(config: Any) -> dict[str, int]:
    """Parameter counts per part of the model, from the real classes on the meta device."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    parts = {
        "embeddings": "model.language_model.embed_tokens.",
        "per_layer_embeddings": "model.language_model.embed_tokens_per_layer.",
        "vision": "model.vision_tower.",
        "vision_projector": "model.embed_vision.",
        "audio": "model.audio_tower.",
        "audio_projector": "model.embed_audio.",
        "text_decoder": "model.language_model.",
    }
    counts = dict.fromkeys(parts, 0)
    counts["lm_head_untied"] = 0
    for name, param in model.named_parameters():
        part = next((k for k, prefix in parts.items() if name.startswith(prefix)), "lm_head_untied")
        counts[part] += param.numel()
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(counts.values())
    return counts
