"""A run's plan before any weight is read: the model's module tree on the meta device, its targets, engine notes and memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma4_tune.model.catalog import resolve_variant
from gemma4_tune.model.profile import FAMILIES, ModelProfile, meta_module
from gemma4_tune.plan.memory import WeightMemory
from gemma4_tune.plan.targets import TargetPlan


def meta_model(model: str | Path) -> tuple[Any, ModelProfile]:
    """The real module tree of ``model`` (directory or catalog id) on the meta device: no weights read."""
    profile = ModelProfile.from_pretrained(model)
    return meta_module(profile_config(model)), profile


def profile_config(model: str | Path) -> Any:
    """The Gemma 4 config (either family) of a directory or catalog id."""
    path = Path(model)
    if path.is_dir():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path))
    data = resolve_variant(str(model)).config
    config_class = FAMILIES[data["model_type"]].transformers_class("config")
    return config_class(**{k: v for k, v in data.items() if k not in ("architectures", "transformers_version")})


def plan(model: str | Path, targets: str = "text", *, rank: int = 16,
         quantize: str | None = None) -> tuple[ModelProfile, TargetPlan, WeightMemory]:
    """Resolve a target spec on a model without loading weights; with engine notes and memory."""
    from gemma4_tune.plan.deployment import deployment_findings
    from gemma4_tune.plan.memory import weight_memory
    from gemma4_tune.plan.targets import plan_targets

    module, profile = meta_model(model)
    target_plan = plan_targets(module, profile, targets, rank=rank)
    text_names = {t.name for t in target_plan.targets if t.group == "text" and t.kind == "linear"}
    target_plan.findings = deployment_findings(rank, target_plan.groups, text_names,
                                               bool(target_plan.target_parameters))
    return profile, target_plan, weight_memory(module, quantize)
