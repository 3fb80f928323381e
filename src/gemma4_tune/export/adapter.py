"""Check a saved adapter against the engines it will be served by, before anyone deploys it.

Reads the adapter as it is on disk (its config and tensor names, mapped onto the base
checkpoint by ``manifest.checked_adapter``), so it judges what the engine will load, not
what the training plan meant. The rules are the data in ``plan/deployment.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.export.manifest import checked_adapter
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.model.profile import ModelProfile, part_of
from gemma4_tune.plan.deployment import ENGINES, deployment_findings

KV_SHARED_LORA_IGNORED = register("G4T208", Severity.WARNING, "LoRA on k/v of KV-shared layers is ignored", (8,))
UNKNOWN_ENGINE = register("G4T209", Severity.ERROR, "Unknown target engine")
VLLM_K_EQ_V = register("G4T210", Severity.WARNING, "vLLM keeps k_proj LoRA off the values of K=V layers", (4,))

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class AdapterSummary:
    """What an adapter on disk contains, in the terms engines care about."""

    rank: int
    groups: list[str]
    text_modules: list[str]
    has_experts: bool
    tensors: int
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"rank": self.rank, "groups": self.groups, "text_modules": self.text_modules,
                "has_experts": self.has_experts, "tensors": self.tensors,
                "findings": [f.to_dict() for f in self.findings]}


def check_adapter_for_engines(base: str | Path, adapter: str | Path, engines: list[str]) -> AdapterSummary:
    """Map the adapter onto the base (refusing a foreign base) and list what each engine will do with it."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise FindingError(finding(UNKNOWN_ENGINE.code, f"unknown engine(s): {', '.join(unknown)}",
                                   f"use one or more of {', '.join(ENGINES)}"))
    checked = checked_adapter(adapter, base)  # refuses DoRA, bias and modules_to_save for every engine (G4T803)
    deltas = [d for ds in checked.layout.deltas.values() for d in ds]
    rank = max(d.rank for d in deltas)
    groups = sorted({part_of(d.base_key) for d in deltas}, key=["text", "vision", "audio"].index)
    text_modules = sorted({d.base_key.removesuffix(".weight").rsplit(".", 1)[-1] for d in deltas
                           if d.kind == "linear" and part_of(d.base_key) == "text"})
    has_experts = any(d.kind == "experts" for d in deltas)
    findings: list[Finding] = list(checked.notes)
    profile = ModelProfile.from_pretrained(base, count_parameters=False)
    if "vllm" in engines or "llama.cpp" in engines:
        # a part without a tower (the 12B) is its embedder's group
        planned = [g if g == "text" or profile.tower(g) else f"{g}-embed" for g in groups]
        all_findings = deployment_findings(rank, planned, text_modules, has_experts)
        wanted = {"vllm": ("G4T201", "G4T202", "G4T203", "G4T205", "G4T206"), "llama.cpp": ("G4T204",)}
        codes = {c for e in engines for c in wanted.get(e, ())}
        findings += [f for f in all_findings if f.code in codes]
    if "vllm" in engines:
        from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers

        layers = k_eq_v_lora_layers(base, adapter)
        if layers:
            findings.append(finding(VLLM_K_EQ_V.code, f"on the K=V global layers {layers} transformers applies the "
                                    "k_proj LoRA to keys and values; vLLM 0.32 applies it to the keys only, so the "
                                    "served model differs silently", "serve the merged checkpoint, or export a "
                                    "vLLM-ready copy with `gemma4-tune export --vllm-adapter DIR` (k_proj LoRA "
                                    "duplicated onto v_proj; vLLM only)"))
    shared = {layer.index for layer in profile.layers if layer.kv_sharing == "reuse"}
    ignored = sorted({d.base_key for d in deltas if d.kind == "linear" and part_of(d.base_key) == "text"
                      and re.search(r"\.self_attn\.(k_proj|v_proj)\.", d.base_key)
                      and (m := _LAYER.search(d.base_key)) and int(m.group(1)) in shared})
    if ignored:
        findings.append(finding(KV_SHARED_LORA_IGNORED.code, f"{len(ignored)} LoRA updates target k/v projections "
                                "of KV-shared layers, which read K/V from an earlier layer: transformers and vLLM "
                                f"ignore them (e.g. {ignored[0]})", "drop them: plan with `gemma4-tune plan`, "
                                "which skips those projections"))
    return AdapterSummary(rank, groups, text_modules, has_experts, len(deltas) * 2, findings)

