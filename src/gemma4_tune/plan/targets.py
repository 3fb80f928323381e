"""Target specs -> TargetPlan: exact module paths and expert parameters that get LoRA.

Targets are found by module type, never by bare name: language-model projections
are ``nn.Linear`` under each decoder layer; tower projections are
``Gemma4ClippableLinear`` wrappers, whose inner ``.linear`` is the LoRA target so
the clamps stay in the forward pass and keys keep the official layout (failure
catalog rows 1, 2); MoE experts are 3-D parameters reached through PEFT's
``target_parameters`` (row 16); the multimodal embedders (the 12B's only way in for
images and audio) are their own groups, never part of ``text`` (row 37). Layers that
lack a projection (KV-shared layers, K=V global layers) are listed as skipped with the
reason (row 8).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from gemma4_tune.findings import (
    Finding,
    FindingError,
    Severity,
    finding,
    register,
)
from gemma4_tune.model.profile import ModelProfile, tower_of

BAD_TARGET_SPEC = register("G4T101", Severity.ERROR, "Target spec matches nothing that can carry LoRA", (1, 3))
TOWER_NOT_IN_MODEL = register("G4T102", Severity.ERROR, "Target group names a tower this model lacks")
UNKNOWN_TARGET_GROUP = register("G4T103", Severity.ERROR, "Unknown target group")

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
GROUPS = ("text", "text-attention", "text-mlp", "text-experts", "vision", "audio", "vision-embed", "audio-embed",
          "all")
TOWER_GROUPS = {"vision": "model.vision_tower", "audio": "model.audio_tower"}
EMBED_GROUPS = {"vision-embed": "model.embed_vision", "audio-embed": "model.embed_audio"}
#: The data modality a group's LoRA learns from: a batch without it gives the group no gradient.
GROUP_MODALITY = {"vision": "image", "vision-embed": "image", "audio": "audio", "audio-embed": "audio"}
PATTERN_PREFIX = "re:"


@dataclass(frozen=True)
class PlannedTarget:
    """One module or expert parameter that gets LoRA."""

    path: str  # module path (for experts: path of the parameter)
    group: str  # text, vision, audio, vision-embed, audio-embed
    kind: str  # linear, clippable (inner .linear), experts
    layer: int | None
    name: str
    in_features: int
    out_features: int
    num_experts: int = 1

    def lora_parameters(self, rank: int) -> int:
        """Trainable LoRA parameters at ``rank`` (PEFT's layout: r x experts rows)."""
        return rank * self.num_experts * (self.in_features + self.out_features)


@dataclass(frozen=True)
class SkippedTarget:
    """A projection the spec asked for that this layer does not have, and why."""

    group: str
    layer: int
    name: str
    reason: str


@dataclass
class TargetPlan:
    """What a LoRA spec resolves to on one model."""

    spec: str
    rank: int
    targets: list[PlannedTarget]
    skipped: list[SkippedTarget]
    findings: list[Finding] = field(default_factory=list)

    @property
    def target_modules(self) -> list[str]:
        """Exact module paths for ``LoraConfig.target_modules``."""
        return sorted(t.path for t in self.targets if t.kind != "experts")

    @property
    def target_parameters(self) -> list[str]:
        """Exact parameter paths for ``LoraConfig.target_parameters`` (MoE experts)."""
        return sorted(t.path for t in self.targets if t.kind == "experts")

    @property
    def groups(self) -> list[str]:
        """Groups that received at least one target, in plan order."""
        return list(dict.fromkeys(t.group for t in self.targets))

    def trainable_by_group(self) -> dict[str, int]:
        """LoRA parameters per group and in total."""
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.group] = out.get(t.group, 0) + t.lora_parameters(self.rank)
        out["total"] = sum(out.values())
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "spec": self.spec,
            "rank": self.rank,
            "groups": self.groups,
            "trainable_parameters": self.trainable_by_group(),
            "target_modules": self.target_modules,
            "target_parameters": self.target_parameters,
            "targets": [asdict(t) for t in self.targets],
            "skipped": [asdict(s) for s in self.skipped],
            "findings": [f.to_dict() for f in self.findings],
        }


def parse_spec(spec: str) -> list[str]:
    """Split ``text,vision`` into items; ``re:...`` items are regular expressions over module paths."""
    items = [item.strip() for item in spec.split(",") if item.strip()] if spec else []
    if not items:
        raise FindingError(finding(UNKNOWN_TARGET_GROUP.code, "the target spec is empty",
                                   f"use one or more of {', '.join(GROUPS)}, or {PATTERN_PREFIX}<regex>"))
    for item in items:
        if item.startswith(PATTERN_PREFIX):
            try:
                re.compile(item[len(PATTERN_PREFIX):])
            except re.error as exc:
                raise FindingError(finding(BAD_TARGET_SPEC.code, f"pattern {item!r} is not a valid regex: {exc}",
                                           "fix the regular expression (it must match whole module paths)")) from None
        elif item not in GROUPS:
            raise FindingError(finding(UNKNOWN_TARGET_GROUP.code, f"unknown target group {item!r}",
                                       f"use one or more of {', '.join(GROUPS)}, or {PATTERN_PREFIX}<regex>"))
    return items


def _clippable_type() -> type:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    return Gemma4ClippableLinear


def _experts_type() -> type:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    return Gemma4TextExperts


def _layer_index(path: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", path + ".")
    return int(match.group(1)) if match else None


def _text_targets(model: nn.Module, profile: ModelProfile, names: tuple[str, ...], experts: bool,
                  group: str) -> tuple[list[PlannedTarget], list[SkippedTarget]]:
    targets, skipped = [], []
    modules = dict(model.named_modules())
    experts_type = _experts_type()
    for layer in profile.layers:
        base = f"{profile.text_prefix}.layers.{layer.index}"
        for name in names:
            sub = "self_attn" if name in ATTENTION else "mlp"
            module = modules.get(f"{base}.{sub}.{name}")
            if isinstance(module, nn.Linear):
                targets.append(PlannedTarget(f"{base}.{sub}.{name}", group, "linear", layer.index, name,
                                             module.in_features, module.out_features))
            elif name in ("k_proj", "v_proj") and layer.kv_sharing == "reuse":
                skipped.append(SkippedTarget(group, layer.index, name,
                                             "KV-shared layer: reuses K/V computed by an earlier layer, has no "
                                             f"{name} (row 8)"))
            elif name == "v_proj" and layer.k_eq_v:
                skipped.append(SkippedTarget(group, layer.index, name,
                                             "K=V global layer: values reuse the key projection, no v_proj (row 8)"))
        if experts:
            module = modules.get(f"{base}.experts")
            if isinstance(module, experts_type):
                for pname in EXPERT_PARAMS:
                    param = getattr(module, pname)
                    n_exp, d_out, d_in = param.shape
                    targets.append(PlannedTarget(f"{base}.experts.{pname}", group, "experts", layer.index,
                                                 f"experts.{pname}", d_in, d_out, n_exp))
    return targets, skipped


def _tower_targets(model: nn.Module, group: str) -> list[PlannedTarget]:
    prefix = TOWER_GROUPS[group] + "."
    clippable = _clippable_type()
    out = []
    for path, module in model.named_modules():
        if path.startswith(prefix) and isinstance(module, clippable):
            inner = module.linear
            out.append(PlannedTarget(f"{path}.linear", group, "clippable", _layer_index(path),
                                     path.rsplit(".", 1)[-1], inner.in_features, inner.out_features))
    return out


def _embedder_targets(model: nn.Module, group: str) -> list[PlannedTarget]:
    prefix = EMBED_GROUPS[group] + "."
    return [PlannedTarget(path, group, "linear", None, path.removeprefix(prefix), module.in_features,
                          module.out_features)
            for path, module in model.named_modules() if path.startswith(prefix) and isinstance(module, nn.Linear)]


def _pattern_targets(model: nn.Module, pattern: str) -> tuple[list[PlannedTarget], list[str]]:
    regex = re.compile(pattern)
    clippable = _clippable_type()
    targets, unusable = [], []
    for path, module in model.named_modules():
        if not path or not regex.fullmatch(path):
            continue
        if isinstance(module, clippable):
            module, path = module.linear, f"{path}.linear"
        if isinstance(module, nn.Linear):
            group = tower_of(path)
            targets.append(PlannedTarget(path, group, "clippable" if path.endswith(".linear") else "linear",
                                         _layer_index(path), path.rsplit(".", 1)[-1], module.in_features,
                                         module.out_features))
        else:
            unusable.append(f"{path} ({type(module).__name__})")
    return targets, unusable


def plan_targets(model: nn.Module, profile: ModelProfile, spec: str = "text", rank: int = 16) -> TargetPlan:
    """Resolve ``spec`` on ``model`` (real or meta-device) into a TargetPlan.

    Raises a FindingError when any item resolves to nothing that can carry LoRA:
    a silently empty or partial adapter is never produced.
    """
    items = parse_spec(spec)
    targets: list[PlannedTarget] = []
    skipped: list[SkippedTarget] = []
    errors: list[Finding] = []
    for item in items:
        if item.startswith(PATTERN_PREFIX):
            found, unusable = _pattern_targets(model, item[len(PATTERN_PREFIX):])
            if not found:
                what = f"only modules that cannot carry LoRA: {', '.join(unusable[:5])}" if unusable else "no module"
                errors.append(finding(BAD_TARGET_SPEC.code, f"pattern {item!r} matches {what}",
                                      "match nn.Linear or Gemma4ClippableLinear module paths; see "
                                      "`gemma4-tune plan --json` for the paths of this model"))
            targets += found
        elif item == "all":
            found, sk = _text_targets(model, profile, ATTENTION + MLP, experts=True, group="text")
            targets += found
            skipped += sk
            for tower in TOWER_GROUPS:
                if profile.tower(tower) is not None:
                    targets += _tower_targets(model, tower)
                elif profile.embedder(tower) is not None:
                    # no tower (the 12B): the embedder is all an image or a sound passes through
                    targets += _embedder_targets(model, profile.embedder(tower).group)
        elif item == "text-experts":
            found, _ = _text_targets(model, profile, (), experts=True, group="text")
            if not found:
                errors.append(finding(BAD_TARGET_SPEC.code, f"target group 'text-experts': this model "
                                      f"({profile.variant or profile.source}) has no MoE experts",
                                      "drop 'text-experts' (only the 26B-A4B has experts)"))
            targets += found
        elif item in TOWER_GROUPS:
            if profile.tower(item) is None:
                embedder = profile.embedder(item)
                errors.append(finding(TOWER_NOT_IN_MODEL.code,
                                      f"target group {item!r}: this model ({profile.variant or profile.source}) "
                                      f"has no {item} tower" + (f"; its {item} input goes through "
                                                                f"{embedder.module_prefix} only" if embedder else ""),
                                      f"use {embedder.group!r} to train that embedder" if embedder
                                      else f"drop {item!r} from --targets"))
                continue
            targets += _tower_targets(model, item)
        elif item in EMBED_GROUPS:
            name = item.removesuffix("-embed")
            if profile.embedder(name) is None:
                errors.append(finding(TOWER_NOT_IN_MODEL.code,
                                      f"target group {item!r}: this model ({profile.variant or profile.source}) "
                                      f"takes no {name} input", f"drop {item!r} from --targets"))
                continue
            targets += _embedder_targets(model, item)
        else:
            names = {"text": ATTENTION + MLP, "text-attention": ATTENTION, "text-mlp": MLP}[item]
            found, sk = _text_targets(model, profile, names, experts=item in ("text", "text-mlp"), group="text")
            targets += found
            skipped += sk
    if errors:
        raise FindingError(*errors)
    unique = list({t.path: t for t in targets}.values())
    skipped = list({(s.layer, s.name): s for s in skipped}.values())
    return TargetPlan(spec=",".join(items), rank=rank, targets=unique, skipped=skipped)
