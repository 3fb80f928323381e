"""RunConfig: every training knob, from CLI flags or a YAML file that maps 1:1 to them.

Unknown YAML keys are refused with a did-you-mean; the keys Axolotl users already
know (``base_model``, ``lora_r``, ``micro_batch_size``...) are accepted as aliases.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gemma4_tune.findings import FindingError, Severity, finding, register

BAD_CONFIG = register("G4T005", Severity.ERROR, "Invalid run configuration")

ALIASES = {
    "base_model": "model",
    "datasets": "data",
    "output_dir": "out",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "learning_rate": "lr",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_epochs": "epochs",
    "sequence_len": "max_seq_len",
    "lora_target_modules": "targets",
    "val_set_size": "eval_split",
}


class RunConfig(BaseModel):
    """One training run. Field names are the CLI flags (``--max-steps`` -> ``max_steps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    data: str
    out: str
    targets: str = "text"
    rank: int = Field(16, ge=1)
    alpha: int | None = Field(None, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    max_steps: int = Field(-1, ge=-1)
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(2048, ge=16)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    seed: int = 0
    train_on: Literal["assistant", "all"] = "assistant"
    packing: bool = False
    skip_invalid: bool = False
    gradient_checkpointing: bool = True
    warmup_steps: int = Field(0, ge=0)
    logging_steps: int = Field(1, ge=1)
    resume: bool = False
    preflight: bool = True
    template_revision: str | None = None
    quantize: Literal["4bit"] | None = None
    eval_data: str | None = None
    eval_split: float = Field(0.0, ge=0.0, lt=1.0)
    eval_steps: int | None = Field(None, ge=1)
    samples: int = Field(4, ge=0)
    sample_max_tokens: int = Field(32, ge=1)
    distributed: Literal["ddp", "fsdp2", "zero2", "zero3"] | None = None
    nproc: int | None = Field(None, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)

    @model_validator(mode="after")
    def _one_eval_source(self) -> RunConfig:
        if self.eval_data and self.eval_split:
            raise ValueError("give --eval-data or --eval-split, not both")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain dict (for reports and manifests)."""
        return self.model_dump()


def _did_you_mean(key: str) -> str:
    choices = list(RunConfig.model_fields) + list(ALIASES)
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(RunConfig.model_fields)}"


def build_config(values: dict[str, Any], *, source: str = "flags") -> RunConfig:
    """Validate a dict of settings into a RunConfig, turning every problem into a finding."""
    normalised: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key).replace("-", "_")
        if name == "targets" and isinstance(value, list):
            value = ",".join(value)
        if name == "data" and isinstance(value, list):
            if len(value) != 1:
                raise FindingError(finding(BAD_CONFIG.code, f"{source}: 'data' lists {len(value)} datasets",
                                           "give one JSONL file or dataset directory"))
            value = value[0]["path"] if isinstance(value[0], dict) else value[0]
        normalised[name] = value
    unknown = [k for k in normalised if k not in RunConfig.model_fields]
    if unknown:
        raise FindingError(*[finding(BAD_CONFIG.code, f"{source}: unknown key '{k}'", _did_you_mean(k))
                             for k in unknown])
    try:
        return RunConfig(**normalised)
    except ValidationError as exc:
        raise FindingError(*[
            finding(BAD_CONFIG.code, f"{source}: {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}",
                    "fix the value (see `gemma4-tune train --help`)")
            for err in exc.errors()
        ]) from None


def load_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run file; flags given on the command line override its values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FindingError(finding(BAD_CONFIG.code, f"{path} does not exist", "check the path of the run file")) \
            from None
    except yaml.YAMLError as exc:
        raise FindingError(finding(BAD_CONFIG.code, f"{path} is not valid YAML: {exc}", "fix the YAML syntax")) \
            from None
    if not isinstance(data, dict):
        raise FindingError(finding(BAD_CONFIG.code, f"{path} must hold a mapping of keys to values",
                                   "write `key: value` lines, e.g. `model: runs/tiny-e2b`"))
    return build_config({**data, **(overrides or {})}, source=str(path))
