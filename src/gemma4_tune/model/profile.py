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

from gemma4_tune.findings import MODEL_NOT_FOUND, NOT_GEMMA4, FindingError, finding
from gemma4_tune.model.catalog import Variant, resolve_variant, variants

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
        return FAMILIES["gemma4"].layer_classes[self.name]


@dataclass(frozen=True)
class EmbedderFacts:
    """The projection that carries an image or audio part into the text stream.

    The encoder models (E2B, E4B, 26B-A4B, 31B) put one after each tower; the 12B has no
    towers and embeds raw patches and raw audio frames with nothing but these.
    """

    name: str  # "vision" or "audio"
    module_prefix: str
    input_size: int  # what enters the embedder: tower width, or raw patch / frame width (12B)
    hidden_size: int

    @property
    def group(self) -> str:
        """The target group of this embedder's linears (never part of ``text``)."""
        return f"{self.name}-embed"


@dataclass(frozen=True)
class Family:
    """One Gemma 4 architecture in transformers: its classes and the repeated block of each part."""

    model_type: str
    config_class: str
    model_class: str
    processor_class: str
    #: The repeated block of each part: what FSDP wraps and shards as one unit (row 25).
    layer_classes: dict[str, str]

    def transformers_class(self, which: str = "model") -> Any:
        """The transformers class named by ``which`` (model, config or processor)."""
        import transformers

        return getattr(transformers, {"model": self.model_class, "config": self.config_class,
                                      "processor": self.processor_class}[which])


#: The Gemma 4 architectures, by ``model_type``: the four encoder models, and the 12B ("unified",
#: encoder-free: raw patches and audio frames go through embedders only, row 37).
FAMILIES = {
    "gemma4": Family("gemma4", "Gemma4Config", "Gemma4ForConditionalGeneration", "Gemma4Processor",
                     {"text": "Gemma4TextDecoderLayer", "vision": "Gemma4VisionEncoderLayer",
                      "audio": "Gemma4AudioLayer"}),
    "gemma4_unified": Family("gemma4_unified", "Gemma4UnifiedConfig", "Gemma4UnifiedForConditionalGeneration",
                             "Gemma4UnifiedProcessor", {"text": "Gemma4UnifiedTextDecoderLayer"}),
}


@dataclass
class ModelProfile:
    """Structural facts about one Gemma 4 checkpoint."""

    source: str
    variant: str | None
    tiny: bool
    model_type: str
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
    embedders: list[EmbedderFacts] = field(default_factory=list)
    parameters: dict[str, int] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        """The transformers architecture this checkpoint is."""
        return FAMILIES[self.model_type]

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

    def embedder(self, name: str) -> EmbedderFacts | None:
        """The named embedder (vision or audio), if the checkpoint has it."""
        return next((e for e in self.embedders if e.name == name), None)

    def has_part(self, name: str) -> bool:
        """Whether images (``vision``) or audio (``audio``) have a way into this model."""
        return self.tower(name) is not None or self.embedder(name) is not None

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
                    moe=bool(getattr(text, "enable_moe_block", False)),
                )
            )
        towers, embedders = _parts(config)
        moe = None
        if getattr(text, "enable_moe_block", False):
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
            model_type=config.model_type,
            architecture=(getattr(config, "architectures", None) or [FAMILIES[config.model_type].model_class])[0],
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
            ple_hidden_size=getattr(text, "hidden_size_per_layer_input", 0) or 0,
            moe=moe,
            tied_embeddings=bool(config.tie_word_embeddings),
            final_logit_softcapping=text.final_logit_softcapping,
            token_ids=token_ids,
            embedders=embedders,
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


def _parts(config: Any) -> tuple[list[TowerFacts], list[EmbedderFacts]]:
    """The towers and the embedders of a config, as its model class builds them."""
    text_hidden = config.text_config.hidden_size
    towers, embedders = [], []
    for name, sub in (("vision", config.vision_config), ("audio", config.audio_config)):
        if sub is None:
            continue
        if config.model_type == "gemma4_unified":
            # Raw 48x48 RGB patches (LayerNorm, Dense, position embedding) or raw audio frames, then
            # RMSNorm and the projection into the text stream: modeling_gemma4_unified's embedders.
            width = sub.model_patch_size**2 * 3 if name == "vision" else sub.audio_embed_dim
            embedders.append(EmbedderFacts(name, f"model.embed_{name}", width, text_hidden))
            continue
        towers.append(TowerFacts(name, f"model.{name}_tower", sub.num_hidden_layers, sub.hidden_size,
                                 bool(sub.use_clipped_linears)))
        width = getattr(sub, "output_proj_dims", None) or sub.hidden_size
        embedders.append(EmbedderFacts(name, f"model.embed_{name}", width, text_hidden))
    return towers, embedders


def _as_config(config: Any, source: str) -> Any:
    import transformers

    classes = tuple(family.transformers_class("config") for family in FAMILIES.values())
    if isinstance(config, classes):
        return config
    if isinstance(config, dict):
        model_type = config.get("model_type")
        if model_type not in FAMILIES:
            hint = ("a text-only Gemma 4 config (gemma4_text); load the full multimodal checkpoint instead"
                    if model_type in ("gemma4_text", "gemma4_unified_text") else f"model_type is {model_type!r}")
            raise FindingError(finding(NOT_GEMMA4.code, f"{source} is not a Gemma 4 checkpoint ({hint})",
                                       f"use a Gemma 4 checkpoint (model_type {' or '.join(map(repr, FAMILIES))}), "
                                       "e.g. google/gemma-4-E2B-it"))
        kwargs = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        cfg = getattr(transformers, FAMILIES[model_type].config_class)(**kwargs)
        cfg.architectures = config.get("architectures")
        return cfg
    raise FindingError(finding(NOT_GEMMA4.code, f"{source}: unsupported config object {type(config).__name__}",
                               "pass a Gemma 4 config or a model directory"))


_STRUCTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_kv_shared_layers", "enable_moe_block",
                   "attention_k_eq_v", "hidden_size_per_layer_input")


def _match_variant(config: Any) -> str | None:
    """The catalog variant with the same architecture and text structure, if any."""
    text = config.text_config
    for variant in variants().values():
        if variant.config.get("model_type") != config.model_type:
            continue
        published = variant.config["text_config"]
        if all(published.get(k, getattr(text.__class__, k, None)) == getattr(text, k, None)
               for k in _STRUCTURE_KEYS):
            return variant.id
    return None


def meta_module(config: Any) -> Any:
    """The real module tree of a Gemma 4 config (either family) on the meta device: no weights."""
    import torch

    with torch.device("meta"):
        return FAMILIES[config.model_type].transformers_class()(config)


#: Where each group's modules are, as dotted path segments: transformers' module names and, for the 12B's
#: vision embedder, the name its checkpoint stores (``vision_embedder``, renamed on load).
PART_MARKS = {"vision": (".vision_tower.",), "audio": (".audio_tower.",),
              "vision-embed": (".embed_vision.", ".vision_embedder."), "audio-embed": (".embed_audio.",)}


def tower_of(path: str) -> str:
    """The group a module path, parameter, checkpoint or adapter key belongs to: ``text``, a tower or an embedder.

    The one rule for "which part of the model is this": with or without PEFT's ``base_model.model.`` and
    the ``model.`` prefix, and under the names a checkpoint stores (the 12B's ``vision_embedder``).
    """
    dotted = f".{path}."
    return next((group for group, marks in PART_MARKS.items() if any(m in dotted for m in marks)), "text")


def part_of(key: str) -> str:
    """``text``, ``vision`` or ``audio``: :func:`tower_of` with each embedder counted in its tower's part.

    What export, verify and serve use to split an adapter into what vLLM's text LoRA serves and the rest.
    """
    return tower_of(key).removesuffix("-embed")


def count_parameters_by_part(config: Any) -> dict[str, int]:
    """Parameter counts per part of the model, from the real classes on the meta device."""
    model = meta_module(config)
    # behind a tower the embedder is a projection; without one (the 12B) it is the whole way in
    embedder = "embedder" if config.model_type == "gemma4_unified" else "projector"
    parts = {
        "embeddings": "model.language_model.embed_tokens.",
        "per_layer_embeddings": "model.language_model.embed_tokens_per_layer.",
        "vision": "model.vision_tower.",
        f"vision_{embedder}": "model.embed_vision.",
        "audio": "model.audio_tower.",
        f"audio_{embedder}": "model.embed_audio.",
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
