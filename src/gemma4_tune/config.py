"""RunConfig: every training knob, from CLI flags or a YAML file that maps 1:1 to them.

Unknown keys of our own YAML are refused (with a did-you-mean only when one key is close). A file written
for Axolotl (one with ``base_model``, which Axolotl requires) is read by ``axolotl.translate`` with Axolotl's
meaning of every key; what it became is ``ImportedConfig.mapping`` (``train --explain-config``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gemma4_tune.data.formats import FORMATS, ChatOptions
from gemma4_tune.data.records import DataSource
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register

BAD_CONFIG = register("G4T005", Severity.ERROR, "Invalid run configuration")


class DatasetSpec(BaseModel):
    """One dataset of a run: where it is, which split, and how its rows are read (docs/formats.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    split: str | None = None
    format: str | None = None
    field_messages: str | None = None
    message_property_mappings: dict[str, str] = Field(default_factory=dict)
    roles: dict[str, list[str]] = Field(default_factory=dict)
    roles_to_train: list[str] | None = None
    message_field_training: str | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None and value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; use one of {', '.join(FORMATS)} (or leave it out to detect)")
        return value

    def source(self) -> DataSource:
        """What ``data.records.load_datasets`` reads."""
        return DataSource(self.path, self.split, ChatOptions(
            field_messages=self.field_messages, property_mappings=dict(self.message_property_mappings),
            roles={k: tuple(v) for k, v in self.roles.items()},
            roles_to_train=tuple(self.roles_to_train) if self.roles_to_train is not None else None,
            training_field=self.message_field_training, format=self.format,
        ))


class RunConfig(BaseModel):
    """One training run. Field names are the CLI flags (``--max-steps`` -> ``max_steps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    data: list[DatasetSpec]
    out: str | None = None
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
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    optimizer: str = "adamw_torch"
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    optim_args: str | None = None
    evals_per_epoch: int | None = Field(None, ge=1)
    saves_per_epoch: int | None = Field(None, ge=1)
    logging_steps: int = Field(1, ge=1)
    resume: bool = False
    preflight: bool = True
    template_revision: str | None = None
    quantize: Literal["4bit"] | None = None
    eval_data: str | None = None
    eval_split: float = Field(0.0, ge=0.0)
    eval_steps: int | None = Field(None, ge=1)
    samples: int = Field(4, ge=0)
    sample_max_tokens: int = Field(32, ge=1)
    distributed: Literal["ddp", "fsdp2", "zero2", "zero3"] | None = None
    nproc: int | None = Field(None, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, ge=1, le=65535)

    @field_validator("data", mode="before")
    @classmethod
    def _datasets(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [{"path": item} if isinstance(item, str) else item for item in items]

    @field_validator("data")
    @classmethod
    def _some_data(cls, value: list[DatasetSpec]) -> list[DatasetSpec]:
        if not value:
            raise ValueError("give at least one dataset")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> RunConfig:
        if self.eval_data and self.eval_split:
            raise ValueError("give --eval-data or --eval-split, not both")
        if self.eval_split >= 1 and self.eval_split != int(self.eval_split):
            raise ValueError(f"eval_split {self.eval_split} is neither a share below 1 nor a whole count")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.eval_steps and self.evals_per_epoch:
            raise ValueError("give eval_steps or evals_per_epoch, not both")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes {self.nnodes}")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain dict (for reports and manifests)."""
        return self.model_dump()

    def sources(self) -> list[DataSource]:
        """The datasets to read, in order."""
        return [spec.source() for spec in self.data]

    @property
    def data_label(self) -> str:
        """The datasets as a person reads them (``a.jsonl + b.parquet``)."""
        return " + ".join(spec.path + (f" ({spec.split})" if spec.split else "") for spec in self.data)


@dataclass
class ImportedConfig:
    """A run file read: the RunConfig, where each key went (``mapping``) and what to tell the user."""

    config: RunConfig
    dialect: str = "gemma4-tune"
    mapping: list[dict[str, str]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _did_you_mean(key: str) -> str:
    from gemma4_tune.axolotl import our_name

    if our_name(key):
        return f"did you mean '{our_name(key)}'? ('{key}' is Axolotl's name; a file with base_model is read as Axolotl's)"
    close = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1, cutoff=0.8)
    return f"did you mean '{close[0]}'?" if close else "see `gemma4-tune train --help` for the keys (or docs/axolotl.md)"


def build_config(values: dict[str, Any], *, source: str = "flags") -> RunConfig:
    """Validate a dict of settings into a RunConfig, turning every problem into a finding."""
    normalised: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "targets" and isinstance(value, list):
            value = ",".join(value)
        normalised[name] = value
    unknown = [k for k in normalised if k not in RunConfig.model_fields]
    if unknown:
        listed = ", ".join(f"'{k}' ({_did_you_mean(k)})" if "did you mean" in _did_you_mean(k) else f"'{k}'"
                           for k in unknown)
        raise FindingError(finding(BAD_CONFIG.code, f"{source}: {len(unknown)} unknown key(s): {listed}",
                                   "fix or remove them; see `gemma4-tune train --help` for the keys, and "
                                   "docs/axolotl.md for Axolotl files"))
    try:
        return RunConfig(**normalised)
    except ValidationError as exc:
        raise FindingError(*[
            finding(BAD_CONFIG.code, f"{source}: {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}",
                    "fix the value (see `gemma4-tune train --help`)")
            for err in exc.errors()
        ]) from None


def load_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run file (ours or Axolotl's); flags given on the command line override its values."""
    return read_run_file(path, overrides).config


def read_run_file(path: str | Path, overrides: dict[str, Any] | None = None) -> ImportedConfig:
    """Read a YAML run file: ours (keys = flags) or Axolotl's (read with Axolotl's meaning, see ``axolotl``)."""
    from gemma4_tune import axolotl

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
    if axolotl.is_axolotl(data):
        values, mapping, notes = axolotl.translate(data, source=str(path))
        config = build_config({**values, **(overrides or {})}, source=str(path))
        return ImportedConfig(config, "Axolotl", mapping, notes)
    return ImportedConfig(build_config({**data, **(overrides or {})}, source=str(path)))
