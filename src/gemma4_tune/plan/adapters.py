"""Apply, check, save and load LoRA adapters with stock PEFT.

LoRA goes exactly where the TargetPlan says, through PEFT's public
``target_modules`` (exact module paths) and ``target_parameters`` (MoE experts).
Tower ``Gemma4ClippableLinear`` wrappers stay in place; only their inner
``.linear`` is wrapped, so the clamps keep acting and saved keys use the
official layout that stock PEFT, transformers and vLLM expect (catalog rows 1-3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.io import atomic_directory
from gemma4_tune.model.profile import ModelProfile, tower_of
from gemma4_tune.model.quantization import QuantSpec
from gemma4_tune.plan.deployment import deployment_findings
from gemma4_tune.plan.targets import TargetPlan, plan_targets

TARGET_NOT_WRAPPED = register("G4T110", Severity.ERROR, "A planned target carries no LoRA", (1, 3, 16))
WRAPPER_REPLACED = register("G4T111", Severity.ERROR, "A clipped tower linear was replaced or unwrapped", (2,))
UNPLANNED_LORA = register("G4T112", Severity.ERROR, "LoRA landed on a module outside the plan", (3,))
PEFT_REJECTED = register("G4T113", Severity.ERROR, "PEFT refused a target module", (1,))
QUANTIZE_UNAVAILABLE = register("G4T120", Severity.ERROR, "4-bit quantization cannot run here", (18,))


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (PEFT names)."""

    rank: int = 16
    alpha: int | None = None  # default: 2 x rank
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def lora_alpha(self) -> int:
        """Alpha actually used."""
        return self.alpha if self.alpha is not None else 2 * self.rank


def lora_config(plan: TargetPlan, settings: LoraSettings) -> Any:
    """The PEFT ``LoraConfig`` for a plan: exact paths, nothing guessed by name."""
    from peft import LoraConfig

    if plan.target_parameters and settings.dropout:
        raise FindingError(finding(PEFT_REJECTED.code, "LoRA dropout is not supported on MoE expert parameters",
                                   "use --lora-dropout 0 when the plan includes experts"))
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.dropout,
        use_rslora=settings.use_rslora,
        target_modules=plan.target_modules or None,
        target_parameters=plan.target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_model(model: nn.Module, spec: str = "text", settings: LoraSettings | None = None,
                  profile: ModelProfile | None = None) -> tuple[Any, TargetPlan]:
    """Plan ``spec`` on ``model``, apply LoRA with PEFT, and prove it landed exactly as planned.

    Returns ``(peft_model, plan)``. Raises FindingError instead of producing an empty,
    partial or misplaced adapter.
    """
    from peft import get_peft_model

    settings = settings or LoraSettings()
    profile = profile or ModelProfile.from_config(model.config, source="in-memory model", count_parameters=False)
    plan = plan_targets(model, profile, spec, rank=settings.rank)
    plan.findings = deployment_findings(settings.rank, plan.groups, {t.name for t in plan.targets
                                                                      if t.group == "text" and t.kind == "linear"},
                                        bool(plan.target_parameters))
    config = lora_config(plan, settings)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise FindingError(finding(PEFT_REJECTED.code, f"PEFT refused the plan: {exc}",
                                   "report this with `gemma4-tune plan --json`; the plan should only name "
                                   "nn.Linear modules and expert parameters")) from exc
    problems = check_lora_placement(peft_model, plan)
    if problems:
        raise FindingError(*problems)
    return peft_model, plan


def quantize_experts(model: Any, quant: QuantSpec) -> QuantSpec:
    """Hold every MoE expert stack (3-D parameters, which bitsandbytes' loading leaves in full precision: row 18)
    in 4 bits with ``quant``'s settings, through bitsandbytes' parametrization (dequantized on each access); returns
    ``quant`` naming them. Applied after LoRA (``model`` a PeftModel or a plain one): PEFT's ``target_parameters``
    matches expert parameters only while they are plain, and its two bugs with a parametrized parameter are
    patched first (``model.patches``)."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from gemma4_tune.model.patches import patch_peft_parametrized_lora
    from gemma4_tune.plan.targets import EXPERT_PARAMS, _experts_type

    patch_peft_parametrized_lora()
    experts_type, names = _experts_type(), []
    for name, module in model.named_modules():
        if isinstance(module, experts_type):
            for param in EXPERT_PARAMS:
                replace_parameter_4bit(module, param, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                       compress_statistics=quant.double_quant)
                names.append(f"{WRAPPER_OR_PEFT.sub('', name)}.{param}")
    return replace(quant, experts=tuple(sorted(names)))


def _base(peft_model: Any) -> nn.Module:
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def check_lora_placement(peft_model: Any, plan: TargetPlan) -> list[Finding]:
    """Judge by module type: every planned target is a LoRA layer, nothing else is, wrappers intact."""
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    base = _base(peft_model)
    modules = dict(base.named_modules())
    problems: list[Finding] = []
    planned_modules = set(plan.target_modules)
    for path in plan.target_modules:
        if not isinstance(modules.get(path), LoraLayer):
            problems.append(finding(TARGET_NOT_WRAPPED.code, f"{path} was planned but carries no LoRA",
                                    "re-run `gemma4-tune plan` on this exact checkpoint; the model structure "
                                    "differs from the plan"))
        if path.endswith(".linear"):
            parent = modules.get(path.rsplit(".", 1)[0])
            if not isinstance(parent, Gemma4ClippableLinear):
                problems.append(finding(WRAPPER_REPLACED.code, f"{path.rsplit('.', 1)[0]} is no longer a "
                                        "Gemma4ClippableLinear: its clamps are gone",
                                        "never unwrap tower linears; apply LoRA to the inner .linear instead"))
    wrapped_params: set[str] = set()
    for path, module in modules.items():
        if isinstance(module, ParamWrapper):
            owner = path
            while owner.endswith(".base_layer"):
                owner = owner[: -len(".base_layer")]
            wrapped_params.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer) and path not in planned_modules:
            problems.append(finding(UNPLANNED_LORA.code, f"{path} carries LoRA but is not in the plan",
                                    "build the adapter through prepare_model so targets are exact paths"))
    for path in plan.target_parameters:
        if path not in wrapped_params:
            problems.append(finding(TARGET_NOT_WRAPPED.code, f"expert parameter {path} was planned but carries "
                                    "no LoRA", "check that peft supports target_parameters (peft >= 0.17)"))
    return problems


def trainable_by_group(peft_model: Any) -> dict[str, int]:
    """Counted trainable LoRA parameters per tower (must equal the plan's figures)."""
    out: dict[str, int] = {}
    for name, param in _base(peft_model).named_parameters():
        if not param.requires_grad:
            continue
        group = tower_of(name)
        out[group] = out.get(group, 0) + param.numel()
    out["total"] = sum(out.values())
    return out


#: Module names that wrappers insert into parameter paths: FSDP's activation checkpointing, FSDP1, torch.compile.
WRAPPER_NAMES = re.compile(r"(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")
#: PEFT's and the wrappers' parts of a module name: what is left is the name in the base model (and checkpoint).
WRAPPER_OR_PEFT = re.compile(r"^base_model\.model\.|\.(?:base_layer|_checkpoint_wrapped_module|_fsdp_wrapped_module|"
                             r"_orig_mod)(?=\.|$)")


def adapter_weights(peft_model: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tensors of the adapter file, keyed as PEFT loads them: PEFT's own selection and renaming, then any
    wrapper module name removed (under FSDP activation checkpointing PEFT would write
    ``layers.0._checkpoint_wrapped_module.mlp...``, keys that load into nothing)."""
    from peft import get_peft_model_state_dict

    return _without_wrapper_names(get_peft_model_state_dict(peft_model, state_dict=state_dict))


def _without_wrapper_names(weights: dict[str, Any]) -> dict[str, Any]:
    return {WRAPPER_NAMES.sub("", k): v for k, v in weights.items()}


def save_adapter(peft_model: Any, out: Path, *, plan: TargetPlan | None = None, overwrite: bool = False,
                 state_dict: dict[str, Any] | None = None) -> Path:
    """Save in stock PEFT format, atomically; the plan goes beside it as ``target_plan.json``.

    ``state_dict`` holds the gathered weights of a model sharded across processes. A tensor that is
    still partitioned (empty, or a shard) is refused before anything is written (G4T411, row 23).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from gemma4_tune.ranks import check_not_empty

    out = Path(out)
    saved = get_peft_model_state_dict(peft_model, state_dict=state_dict)
    weights = _without_wrapper_names(saved)
    check_not_empty(weights, str(out))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=state_dict)
        if weights.keys() != saved.keys():  # PEFT wrote the wrapper names: write the keys it loads instead
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
        if plan is not None:
            (tmp / "target_plan.json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return out


def check_quantization(quantize: str | None) -> None:
    """Refuse 4-bit only where bitsandbytes cannot run it (G4T120), with the fix."""
    if quantize in (None, "none"):
        return
    if quantize != "4bit":
        raise FindingError(finding(QUANTIZE_UNAVAILABLE.code, f"unknown quantization {quantize!r}",
                                   "use --quantize 4bit or leave it out"))
    from gemma4_tune.model.quantization import MIN_CPU_BITSANDBYTES, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise FindingError(finding(QUANTIZE_UNAVAILABLE.code, f"--quantize 4bit cannot run here: {reason}",
                                   f"pip install 'bitsandbytes>={MIN_CPU_BITSANDBYTES}' (gemma4-tune's own "
                                   "dependency), or drop --quantize to train LoRA in full precision"))
