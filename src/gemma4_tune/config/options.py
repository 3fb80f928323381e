"""RunConfig: every training knob, declared once; the CLI flags and the YAML keys are made from it.

Unknown keys are refused (with a did-you-mean only when one key is close). Run files (ours, Axolotl's,
LLaMA-Factory's) are read by the readers beside this module (``run_file``), which import it, never the
other way.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from gemma4_tune.data import dataset_info
from gemma4_tune.data.formats import FORMATS, ChatOptions
from gemma4_tune.data.records import DataSource
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.model.quantization import QuantSpec, default_compute_dtype

BAD_CONFIG = register("G4T005", Severity.ERROR, "Invalid run configuration")

MAX_LR = 1.0
"""Adam moves every LoRA weight by about the learning rate each step: above 1 the adapter turns to noise (the loss of
a tiny model stops falling) or overflows (``lr: 1e30`` made it inf at step 2, stopped only then by G4T403)."""
MAX_SEED = 2**32 - 1
#: The QLoRA settings: each means something only with ``quantize`` (G4T005 otherwise).
QUANT_SETTINGS = ("quant_type", "double_quant", "compute_dtype", "quantize_experts")
#: The GRPO settings: each means something only with ``method: grpo`` (G4T005 otherwise).
GRPO_SETTINGS = ("rewards", "reward_weights", "num_generations", "max_completion_length", "temperature", "loss_type",
                 "thinking")
"""The largest seed numpy's ``np.random.seed`` (called by transformers' ``set_seed``) accepts."""


def _no_bool(value: Any) -> Any:
    """YAML reads ``true``/``yes`` as a boolean: refuse it where a number is meant (pydantic would make it 1)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Whole = Annotated[int, Strict()]
"""A whole number, never a boolean, a float or a string."""
Number = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
"""A finite number (a string such as YAML's unquoted ``1e-4`` is read as one), never a boolean."""
Flag = Annotated[bool, Strict()]
"""true or false, never 0/1 or a string."""

_ALLOWED = {
    "max_steps": "-1 (train for --epochs) or a whole number >= 1",
    "lr": f"a finite number > 0 and <= {MAX_LR:g} (Adam moves each LoRA weight by about lr per step, so above 1 "
          "the adapter turns to noise or overflows; usual values are 1e-5 to 1e-3)",
    "seed": f"a whole number from 0 to {MAX_SEED} (what numpy and transformers' set_seed accept)",
    "epochs": "a finite number > 0",
    "targets": "a string or a list of strings (e.g. text,vision or [text, vision])",
    "data": "a path, or a list of paths and dataset mappings (docs/formats.md)",
}


CLI_KEY = "cli"
"""The key of a RunConfig field's ``json_schema_extra`` that says how ``train``/``preflight`` offer it."""
YAML_ONLY: dict[str, Any] = {CLI_KEY: "yaml-only"}
"""A run-file key (and ``RunConfig`` keyword) with no flag."""
OWN_FLAG: dict[str, Any] = {CLI_KEY: "own"}
"""A field whose flag ``cli.py`` declares itself (``--resume``, ``--no-preflight``)."""


def cli(flag: str | None = None, *, choices: bool = False) -> dict[str, Any]:
    """``json_schema_extra`` of a field whose flag is not the plain ``--field-name`` with the field's type:
    ``flag`` spells it (``--packing/--no-packing``); ``choices`` offers a Literal's values (``<ddp|fsdp2>``), so the
    command line refuses the others (other Literals are plain strings there, checked by RunConfig)."""
    return {CLI_KEY: {"flag": flag, "choices": choices}}


def cli_spec(info: FieldInfo) -> dict[str, Any] | str:
    """How a field is offered on the command line: ``"yaml-only"``, ``"own"`` or ``{"flag": ..., "choices": ...}``
    (``flag`` None: ``--field-name``)."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get(CLI_KEY) or {"flag": None, "choices": False}


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
    columns: dict[str, str] = Field(default_factory=dict)

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
            training_field=self.message_field_training, format=self.format, columns=dict(self.columns),
        ))


class RunConfig(BaseModel):
    """One training run: every option declared once, here.

    A field is a key of the YAML run file, a keyword of ``RunConfig(...)`` and a flag of ``train`` and
    ``preflight`` (``max_steps`` -> ``--max-steps``), whose help is the field's ``description``; ``cli.py`` builds
    the flags from these fields. ``json_schema_extra=cli(...)`` spells a flag otherwise, ``YAML_ONLY`` marks a
    run-file key with no flag, ``OWN_FLAG`` one whose flag ``cli.py`` declares itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model directory")
    data: list[DatasetSpec] = Field(description="Data file (JSONL, JSON, Parquet, CSV) or save_to_disk directory; "
                                                "docs/formats.md")
    out: str | None = Field(None, description="Run directory (adapter, checkpoints, report)")
    method: Literal["sft", "dpo", "kto", "grpo"] = Field(
        "sft", description="sft (default), dpo or kto (preference pairs: prompt / chosen / rejected; "
                           "docs/formats.md), grpo (prompts and reward functions; docs/grpo.md)")
    beta: Number = Field(0.1, ge=0, description="DPO, KTO and GRPO: weight of the KL term against the base [0.1]")
    rewards: list[str] = Field(default_factory=list, description="GRPO: reward function, FILE.py:FUNC, module:FUNC or "
                               "a built-in (ends_turn, exact[:COL], numeric[:COL], regex:PATTERN); repeatable",
                               json_schema_extra=OWN_FLAG)  # --reward
    reward_weights: list[Number] | None = Field(None, description="GRPO: weight of each reward, comma-separated [1 each]",
                                                json_schema_extra=OWN_FLAG)  # --reward-weights 1,0.5
    num_generations: Whole = Field(4, ge=2, description="GRPO: completions per prompt (the group) [4]")
    max_completion_length: Whole = Field(256, ge=1, description="GRPO: tokens per completion at most [256]")
    temperature: Number = Field(1.0, gt=0, description="GRPO: sampling temperature of the rollouts [1.0]")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field("dapo", description="GRPO: loss normalisation "
                                                                  "(TRL's loss_type) [dapo]",
                                                                  json_schema_extra=cli(choices=True))
    thinking: Flag = Field(False, description="GRPO: render prompts with the template's thinking on (enable_thinking) "
                                              "[false]", json_schema_extra=cli("--thinking/--no-thinking"))
    targets: str = Field("text", description="LoRA target spec (see `plan`)")
    rank: Whole = Field(16, ge=1, description="LoRA rank [16]")
    alpha: Whole | None = Field(None, ge=1, description="LoRA alpha [2 x rank]")
    lora_dropout: Number = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout [0]")
    max_steps: Whole = Field(-1, ge=-1, description="Stop after N optimizer steps")
    epochs: Number = Field(1.0, gt=0, description="Epochs when --max-steps is not set [1]")
    lr: Number = Field(2e-4, gt=0, le=MAX_LR, description="Learning rate [2e-4]")
    batch_size: Whole = Field(1, ge=1, description="Micro-batch size [1]")
    grad_accum: Whole = Field(1, ge=1, description="Gradient accumulation steps [1]")
    max_seq_len: Whole = Field(2048, ge=16, description="Truncate examples to N tokens")
    save_steps: Whole = Field(50, ge=1, description="Checkpoint every N steps [50]")
    save_total_limit: Whole = Field(2, ge=1, description="Checkpoints kept, the oldest deleted first [2]",
                                    json_schema_extra=YAML_ONLY)
    seed: Whole = Field(0, ge=0, le=MAX_SEED, description="Seed for weights init, data order, dropout")
    train_on: Literal["assistant", "all"] = Field("assistant", description="assistant (default) or all")
    packing: Flag = Field(False, description="Padding-free packing", json_schema_extra=cli("--packing/--no-packing"))
    skip_invalid: Flag = Field(False, description="Drop bad rows, report them")
    gradient_checkpointing: Flag = Field(True, description="Recompute activations in the backward pass to save "
                                                           "memory [true]", json_schema_extra=YAML_ONLY)
    warmup_steps: Whole = Field(0, ge=0, description="Learning-rate warmup steps [0]", json_schema_extra=YAML_ONLY)
    warmup_ratio: Number = Field(0.0, ge=0.0, lt=1.0, description="Warmup as a share of the run's steps [0]",
                                 json_schema_extra=YAML_ONLY)
    optimizer: str = Field("adamw_torch", description="transformers optimizer name [adamw_torch]",
                           json_schema_extra=YAML_ONLY)
    lr_scheduler: str = Field("linear", description="transformers learning-rate schedule [linear]",
                              json_schema_extra=YAML_ONLY)
    weight_decay: Number = Field(0.0, ge=0.0, description="Weight decay [0]", json_schema_extra=YAML_ONLY)
    max_grad_norm: Number = Field(1.0, ge=0.0, description="Clip gradients to this norm [1]",
                                  json_schema_extra=YAML_ONLY)
    adam_beta1: Number = Field(0.9, gt=0.0, lt=1.0, description="Adam beta1 [0.9]", json_schema_extra=YAML_ONLY)
    adam_beta2: Number = Field(0.999, gt=0.0, lt=1.0, description="Adam beta2 [0.999]", json_schema_extra=YAML_ONLY)
    adam_epsilon: Number = Field(1e-8, gt=0.0, description="Adam epsilon [1e-8]", json_schema_extra=YAML_ONLY)
    optim_args: str | None = Field(None, description="Extra optimizer arguments (transformers' optim_args string)",
                                   json_schema_extra=YAML_ONLY)
    evals_per_epoch: Whole | None = Field(None, ge=1, description="Evaluations per epoch (instead of eval_steps)",
                                          json_schema_extra=YAML_ONLY)
    saves_per_epoch: Whole | None = Field(None, ge=1, description="Checkpoints per epoch (instead of save_steps)",
                                          json_schema_extra=YAML_ONLY)
    logging_steps: Whole = Field(1, ge=1, description="Log the loss every N steps [1]", json_schema_extra=YAML_ONLY)
    resume: Flag = Field(False, description="Continue from the last complete checkpoint",
                         json_schema_extra=OWN_FLAG)  # --resume, listed with the other run-only flags
    preflight: Flag = Field(True, description="Run preflight before training [true]; false is reported as G4T510",
                            json_schema_extra=OWN_FLAG)  # --no-preflight
    template_revision: str | None = Field(None, description="Chat template revision (v1..v5)")
    quantize: Literal["4bit"] | None = Field(None, description="QLoRA: 4-bit base weights (bitsandbytes, CPU or "
                                                               "CUDA; docs/qlora.md)",
                                             json_schema_extra=cli(choices=True))
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA: 4-bit type [nf4]",
                                              json_schema_extra=cli(choices=True))
    double_quant: Flag = Field(True, description="QLoRA: quantize the block constants too [true]",
                               json_schema_extra=cli("--double-quant/--no-double-quant"))
    quantize_experts: Flag = Field(True, description="QLoRA on the 26B-A4B: hold the MoE experts in 4 bits too [true]",
                                   json_schema_extra=cli("--quantize-experts/--no-quantize-experts"))
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="QLoRA: dtype of the 4-bit layers' matmuls [auto: bfloat16 on CUDA, float32 on CPU]",
        json_schema_extra=cli(choices=True))
    eval_data: str | None = Field(None, description="Held-out JSONL/dataset for eval loss")
    eval_split: Number = Field(0.0, ge=0.0, description="Hold out this share of --data's conversations (seeded)")
    eval_steps: Whole | None = Field(None, ge=1, description="Evaluate every N steps [1/4 of the run]")
    samples: Whole = Field(4, ge=0, description="Held-out prompts answered by base and tuned model in the report [4]")
    sample_max_tokens: Whole = Field(32, ge=1, description="Tokens per sample answer [32]")
    distributed: Literal["ddp", "fsdp2", "zero2", "zero3"] | None = Field(
        None, description="Train on several processes (torchrun): ddp, fsdp2, zero2 or zero3",
        json_schema_extra=cli(choices=True))
    nproc: Whole | None = Field(None, ge=1, description="Processes per node [GPUs on the node, else 1]")
    nnodes: Whole = Field(1, ge=1, description="Nodes in the job [1]")
    node_rank: Whole = Field(0, ge=0, description="This node's rank [0]")
    master_addr: str = Field("127.0.0.1", description="Address of node 0 (several nodes)")
    master_port: Whole = Field(29500, ge=1, le=65535, description="Port on node 0 [29500]")

    @field_validator("targets", mode="before")
    @classmethod
    def _target_names(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return ",".join(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a string or a non-empty list of strings")
        return value

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps trains nothing")
        return value

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("reward_weights", mode="before")
    @classmethod
    def _weight_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [float(item) for item in value.split(",")]
            except ValueError:
                raise ValueError(f"expected comma-separated numbers, got {value!r}") from None
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _datasets(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        out: list[Any] = []
        for item in items:
            if isinstance(item, str) and dataset_info.is_v1_yaml(Path(item).expanduser()):
                out += dataset_info.read_v1_yaml(Path(item).expanduser())
            else:
                out.append(_named_dataset(item) or {"path": item} if isinstance(item, str) else item)
        return out

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
        quant_keys = sorted(set(QUANT_SETTINGS) & self.model_fields_set)
        if quant_keys and self.quantize is None:
            raise ValueError(f"{', '.join(quant_keys)} only mean something with quantize: 4bit (QLoRA)")
        if "beta" in self.model_fields_set and self.method == "sft":
            raise ValueError("beta (the KL weight of DPO, KTO and GRPO) has no effect with method: sft")
        if self.beta == 0 and self.method in ("dpo", "kto"):
            raise ValueError(f"beta 0 leaves {self.method.upper()} without its reference: give beta > 0")
        grpo_keys = sorted(set(GRPO_SETTINGS) & self.model_fields_set)
        if grpo_keys and self.method != "grpo":
            raise ValueError(f"{', '.join(grpo_keys)} only mean something with method: grpo")
        if self.method == "grpo":
            if not self.rewards:
                raise ValueError("method grpo needs at least one reward: --reward FILE.py:FUNC, module:FUNC or a "
                                 "built-in (ends_turn, exact, numeric, regex:PATTERN)")
            if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
                raise ValueError(f"{len(self.reward_weights)} reward weights for {len(self.rewards)} rewards")
            if (self.batch_size * self.grad_accum) % self.num_generations:
                raise ValueError(f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple "
                                 f"of num_generations ({self.num_generations}): each group of completions of one "
                                 "prompt is scored together")
        if self.method != "sft" and (self.packing or self.distributed or self.train_on != "assistant"):
            raise ValueError(f"method {self.method} trains its answers on one process: packing, "
                             "--distributed and --train-on all are SFT settings")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain dict (for reports, manifests and launch files); ``beta`` only where it means something (DPO, KTO),
        the 4-bit settings only with ``quantize``: a launch file read back must pass the same validation."""
        excluded = ((set() if self.method != "sft" else {"beta"}) | (set() if self.quantize else set(QUANT_SETTINGS))
                    | (set() if self.method == "grpo" else set(GRPO_SETTINGS)))
        return self.model_dump(exclude=excluded)

    def quant_spec(self) -> QuantSpec | None:
        """The 4-bit settings of a QLoRA run (compute dtype resolved for this machine), None without --quantize."""
        if self.quantize is None:
            return None
        compute = default_compute_dtype() if self.compute_dtype == "auto" else self.compute_dtype
        return QuantSpec(quant_type=self.quant_type, double_quant=self.double_quant, compute_dtype=compute,
                         quantize_experts=self.quantize_experts)

    def sources(self) -> list[DataSource]:
        """The datasets to read, in order."""
        return [spec.source() for spec in self.data]

    @property
    def data_label(self) -> str:
        """The datasets as a person reads them (``a.jsonl + b.parquet``)."""
        return " + ".join(spec.path + (f" ({spec.split})" if spec.split else "") for spec in self.data)


def _named_dataset(item: str) -> dict[str, Any] | None:
    """``DIR/dataset_info.json:NAME`` (or ``DIR:NAME``): LLaMA-Factory's dataset NAME, read with the meaning of its
    entry (``data.dataset_info``); None for any other path."""
    where, sep, name = item.rpartition(":")
    if not sep or not name or "/" in name:
        return None
    info_path = Path(where).expanduser()
    if info_path.is_dir():
        info_path = info_path / dataset_info.FILE_NAME
    if info_path.name != dataset_info.FILE_NAME or not info_path.is_file():
        return None
    entry = dataset_info.resolve(dataset_info.read_info(info_path), name, info_path.parent)
    if entry.refused:
        raise ValueError(f"{item}: {'; '.join(entry.refused)}")
    return entry.spec


def _did_you_mean(key: str, aliases: Mapping[str, tuple[str, str]]) -> str:
    if key in aliases:
        ours, dialect = aliases[key]
        return f"did you mean '{ours}'? ('{key}' is {dialect}'s name; such a file is read as {dialect}'s when it " \
               f"is recognised, docs/config.md)"
    close = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1, cutoff=0.8)
    return f"did you mean '{close[0]}'?" if close else "see `gemma4-tune train --help` for the keys (or docs/axolotl.md)"


def build_config(values: dict[str, Any], *, source: str = "flags", names: dict[str, str] | None = None,
                 aliases: Mapping[str, tuple[str, str]] | None = None) -> RunConfig:
    """Validate a dict of settings into a RunConfig, turning every problem into a finding.

    ``names`` gives the key the user wrote for a field (an Axolotl file's ``learning_rate`` for ``lr``);
    ``aliases`` other tools' keys -> (our key, the tool), for a did-you-mean.
    """
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = [k for k in normalised if k not in RunConfig.model_fields]
    if unknown:
        hints = {k: _did_you_mean(k, aliases or {}) for k in unknown}
        listed = ", ".join(f"'{k}' ({hints[k]})" if "did you mean" in hints[k] else f"'{k}'" for k in unknown)
        raise FindingError(finding(BAD_CONFIG.code, f"{source}: {len(unknown)} unknown key(s): {listed}",
                                   "fix or remove them; see `gemma4-tune train --help` for the keys, and "
                                   "docs/axolotl.md for Axolotl files"))
    try:
        return RunConfig(**normalised)
    except ValidationError as exc:
        raise FindingError(*[_invalid(err, source, names or {}) for err in exc.errors()]) from None


def _invalid(err: Any, source: str, names: dict[str, str]) -> Finding:
    """One pydantic error as a G4T005 finding: the key, the value given, what is wrong and what is allowed."""
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc) or "config"
    if loc and loc[0] in names:
        key = ".".join([f"{names[loc[0]]} ({loc[0]})", *loc[1:]])
    problem = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    if err["type"] == "missing" or not loc:
        return finding(BAD_CONFIG.code, f"{source}: {key}: {problem}", "see `gemma4-tune train --help`", key=key)
    allowed = _allowed(loc[0]) if len(loc) == 1 else None
    value = err["input"]
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return finding(BAD_CONFIG.code, f"{source}: {key}: {problem} (given: {shown})",
                   f"give {key} {allowed}" if allowed else "fix the value (see `gemma4-tune train --help`)", key=key)


_KINDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _allowed(name: str) -> str | None:
    """What a key of RunConfig accepts, in words (``a whole number >= 1, or null``)."""
    if name in _ALLOWED:
        return _ALLOWED[name]
    info = RunConfig.model_fields.get(name)
    if info is None:
        return None
    bounds = " and ".join(f"{word} {getattr(m, attr):g}" for m in info.metadata for attr, word in _BOUNDS
                          if hasattr(m, attr))
    return ", or ".join(f"{kind} {bounds}" if bounds and kind in _KINDS.values() else kind
                        for kind in _kinds(info.annotation))


def _kinds(annotation: Any) -> list[str]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [f"one of {', '.join(map(str, typing.get_args(annotation)))}"]
    if origin is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [kind for arg in typing.get_args(annotation) for kind in _kinds(arg)]
    if annotation is type(None):
        return ["null"]
    return [_KINDS.get(annotation, getattr(annotation, "__name__", str(annotation)))]
