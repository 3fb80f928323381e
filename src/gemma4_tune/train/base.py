"""What every training method is built on: the run's result, the model loading, the Trainer settings, the checks
made before any model loads, the run directory's opening, and :class:`Method`, the parts each method unit
(``train/methods/``) has.

A method is a unit of the same few parts, as PEFT's tuners are: it reads and validates its data before any model
loads, builds its trainer, runs its own preflight checks on a real batch, evaluates on held-out data, and writes its
section of the report; ``train`` composes those parts into the run, top to bottom. ``train.methods`` finds a unit by
name; ``train.run`` runs it.
"""

from __future__ import annotations

import json
import math
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.io import check_writable, ensure_empty_target
from gemma4_tune.model.patches import use_model_image_masks
from gemma4_tune.model.quantization import QuantSpec, load_quantized, spec_of
from gemma4_tune.plan.targets import TargetPlan
from gemma4_tune.preflight import PreflightResult
from gemma4_tune.ranks import is_main_process, local_gpu
from gemma4_tune.train.callbacks import scan_checkpoints, skipped_checkpoints_finding
from gemma4_tune.train.distributed import DistributedPlan
from gemma4_tune.train.rundir import check_not_in_use, check_resume, lock_run_dir, run_record, write_run_start

NO_CHECKPOINT = register("G4T401", Severity.ERROR, "--resume found no complete checkpoint")
EVAL_OVERLAP = register("G4T407", Severity.WARNING, "Held-out data repeats training conversations")
OPTIMIZER_UNAVAILABLE = register("G4T420", Severity.ERROR, "The optimizer cannot run on this machine")

STAGING = ".staging"

_OPTIMIZER_NEEDS = (("bnb", "bitsandbytes"), ("paged_", "bitsandbytes"), ("lion_", "bitsandbytes"),
                    ("adamw_8bit", "bitsandbytes"), ("ademamix", "bitsandbytes"), ("adamw_torch_4bit", "torchao"),
                    ("adamw_torch_8bit", "torchao"), ("anyprecision", "torchdistx"), ("schedule_free", "schedulefree"))


@dataclass
class TrainResult:
    """What a run produced, with the figures the report shows."""

    out: Path
    adapter: Path | None  # None when a guard stopped the run
    plan: TargetPlan
    data: dict[str, Any]
    metrics: list[dict[str, Any]]
    seconds: float
    findings: list[Finding] = field(default_factory=list)
    resumed_from: str | None = None
    model: Any = None  # the trained PeftModel, in memory
    probe_batch: dict[str, torch.Tensor] = field(default_factory=dict)  # SFT's: api verifies the saved adapter on it
    parity: Any = None  # verify.peft.ReloadParity, set by api.run_training
    preflight: Any = None  # preflight.PreflightResult, None when skipped
    samples: list[Any] = field(default_factory=list)  # evaluate.Sample, base vs tuned answers
    report: dict[str, Any] = field(default_factory=dict)  # the sections of report.json, set by api.run_training
    distributed: dict[str, Any] | None = None  # the job the processes formed (strategy, world size, type)
    trained_state: dict[str, torch.Tensor] = field(default_factory=dict)  # gathered LoRA weights (sharded runs)
    dpo: dict[str, Any] = field(default_factory=dict)  # --method dpo or kto: its preflight figures, held-out rewards
    grpo: dict[str, Any] = field(default_factory=dict)  # --method grpo: its preflight figures, held-out rewards
    quant: QuantSpec | None = None  # QLoRA: how the base was quantized (the model trained is that base + adapter)


@dataclass
class ReportSection:
    """A method's part of the run report: its result lines, its own section and its plot."""

    summary: dict[str, Any]  # the report's "Result" lines
    section: dict[str, Any] | None = None  # report.json[<method name>], with its plot's file name added
    plot: Path | None = None  # the method's own plot, beside the report (the loss plot is the report's)
    sections: dict[str, Any] = field(default_factory=dict)  # other top-level report.json sections (SFT: distributed)


class Method(ABC):
    """A training method: the same few parts for every method, each the code the method really runs.

    ``train`` runs them in the method's order (SFT checks its model and batches before it builds its Trainer, whose
    construction reseeds; DPO and KTO check the batch TRL's trainer collates); ``preflight_only`` runs the parts up
    to the checks and writes nothing.
    """

    name: ClassVar[str]  # what --method names: "sft", ...
    description: ClassVar[str]  # one line

    @abstractmethod
    def read_data(self, cfg: RunConfig) -> Any:
        """The training and held-out data, read and validated before any model loads."""

    @abstractmethod
    def build_trainer(self, cfg: RunConfig, data: Any, staging: Path) -> Any:
        """The trainer over ``data``, writing its checkpoints into ``staging`` first."""

    @abstractmethod
    def preflight(self, cfg: RunConfig, built: Any, data: Any) -> PreflightResult:
        """The method's checks on what it built, with one real batch forward and backward."""

    @abstractmethod
    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """The held-out evaluation. The Trainer drives it during the run, so its signature is the method's own:
        SFT's returns the callback that evaluates the base before the first step, then every ``eval_steps`` and at
        the end; DPO's and KTO's evaluate the tuned model after training and judge the rise from the base (G4T515).
        """

    @abstractmethod
    def report_section(self, cfg: RunConfig, result: TrainResult) -> ReportSection:
        """The method's summary lines, its section of report.json and its plot (written into ``result.out``)."""

    @abstractmethod
    def train(self, cfg: RunConfig) -> TrainResult:
        """The run top to bottom, composed from the parts (the run directory's lock is ``train.run``'s to free)."""

    @abstractmethod
    def preflight_only(self, cfg: RunConfig) -> PreflightResult:
        """Data, model, adapter and the checks on a real batch, as ``train`` runs them; nothing is written."""


def check_optimizer(name: str) -> None:
    """Refuse an optimizer whose package is missing before any model is loaded (G4T420). bitsandbytes' and torchao's
    8-bit and 4-bit optimizers step on the CPU too (bitsandbytes >= 0.46.1, torchao 0.18), so no GPU is asked for."""
    import importlib.util

    package = next((pkg for key, pkg in _OPTIMIZER_NEEDS if key in name), None)
    if package is None or importlib.util.find_spec(package) is not None:
        return
    raise FindingError(finding(OPTIMIZER_UNAVAILABLE.code, f"optimizer {name} needs the {package} package, which is "
                               "not installed", f"pip install {package}, or use optimizer: adamw_torch"))


def eval_overlap(train: list[Any], held: list[Any], noun: str, figure: str) -> list[Finding]:
    """G4T407: held-out conversations (or pairs, as one conversation each) identical to training ones, counted."""
    from gemma4_tune.data.records import conversation_key

    seen = {conversation_key(c) for c in train}
    repeated = [c.source for c in held if conversation_key(c) in seen]
    if not repeated:
        return []
    return [finding(EVAL_OVERLAP.code, f"{len(repeated)} of {len(held)} held-out {noun} also appear in the training "
                    f"data (e.g. {repeated[0]}): the {figure} will look better than the model is", "remove them "
                    f"from one of the two files, or use --eval-split, which keeps identical {noun} on one side")]


def per_epoch_steps(cfg: RunConfig, n_examples: int, world: int = 1) -> tuple[int | None, int | None]:
    """``(eval_steps, save_steps)`` from ``evals_per_epoch`` / ``saves_per_epoch``, as Axolotl resolves them.

    Axolotl sets the Trainer's fractional step to ``1 / (n * num_epochs)`` of the total; the Trainer rounds
    ``total * fraction`` up.
    """
    per_epoch = max(1, math.ceil(n_examples / (cfg.batch_size * world)) // cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * cfg.epochs)

    def every(n: int | None) -> int | None:
        return None if n is None else max(1, math.ceil(total / (n * cfg.epochs)))

    return every(cfg.evals_per_epoch), every(cfg.saves_per_epoch)


def device_and_dtype() -> tuple[str, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU; never fp16, which overflows Gemma 4's MLP (row 19)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def training_arguments(cfg: RunConfig, staging: Path, dplan: DistributedPlan | None = None,
                       save_steps: int | None = None) -> Any:
    """The transformers TrainingArguments for a RunConfig (and, under a launcher, its distributed plan).

    ``save_steps`` overrides ``cfg.save_steps`` (``saves_per_epoch`` resolved against the data).
    """
    from transformers import TrainingArguments

    return TrainingArguments(**trainer_settings(cfg, staging, dplan, save_steps))


def trainer_settings(cfg: RunConfig, staging: Path, dplan: DistributedPlan | None = None,
                     save_steps: int | None = None) -> dict[str, Any]:
    """The Trainer settings of a RunConfig, shared by SFT's TrainingArguments and DPO's DPOConfig."""
    device, dtype = device_and_dtype()
    extra = dplan.training_arguments(Path(cfg.out) / "launch") if dplan else {}
    settings = dict(
        output_dir=str(staging),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optimizer,
        optim_args=cfg.optim_args,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=save_steps or cfg.save_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        use_cpu=device == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=True,
    )
    return {**settings, **extra}


def load_model(path: str, quant: QuantSpec | None = None, *,
               sharded: bool = False) -> tuple[Any, Any, QuantSpec | None]:
    """Model, processor and (QLoRA) the quantization as it was applied, with transformers' default attention:
    sdpa for the text and vision towers (never FlashAttention-2, which cannot do the head_dim-512 global layers,
    row 14) and eager for the audio tower, the only implementation it has.

    On GPUs the model goes to this process's GPU, except when FSDP2 or ZeRO-3 will shard it
    (``sharded``): they move only their shard. ``quant``: the base's ``nn.Linear`` weights in 4 bits
    (bitsandbytes, on the CPU or this process's GPU); the returned spec names the modules it replaced."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, dtype = device_and_dtype()
    processor = AutoProcessor.from_pretrained(path)
    if quant is not None:
        quant = replace(quant, load_dtype=str(dtype).removeprefix("torch."))
        model = load_quantized(path, quant, dtype)
        use_model_image_masks(model)
        return model, processor, spec_of(model, quant)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    use_model_image_masks(model)
    if torch.cuda.is_available() and not sharded:
        model.to(f"cuda:{local_gpu()}")
    return model, processor, None


def adapted_model(cfg: RunConfig, profile: Any, *, sharded: bool = False) -> tuple[Any, TargetPlan, Any,
                                                                                QuantSpec | None]:
    """The model every method trains: optimizer and 4-bit settings checked (G4T420, G4T120), seeded, loaded
    (``load_model``), LoRA exactly where the plan says, the 26B-A4B's experts in 4 bits where QLoRA asks;
    ``(peft_model, plan, processor, quant)``."""
    from transformers import set_seed

    from gemma4_tune.plan.adapters import LoraSettings, check_quantization, prepare_model, quantize_experts

    check_quantization(cfg.quantize)
    check_optimizer(cfg.optimizer)
    set_seed(cfg.seed)
    model, processor, quant = load_model(cfg.model, cfg.quant_spec(), sharded=sharded)
    settings = LoraSettings(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)
    peft_model, plan = prepare_model(model, cfg.targets, settings, profile=profile)
    if quant is not None and quant.quantize_experts and profile.moe:
        quant = quantize_experts(peft_model, quant)
    return peft_model, plan, processor, quant


def drop_trl_reference_copy(peft_model: Any) -> None:
    """Delete the ``ref`` adapter TRL's DPO, KTO and GRPO trainers copy from a PeftModel's adapter: the reference is
    then the base with the adapter disabled (``trl.trainer.utils.use_adapter`` with no name), never a copy of it."""
    if "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")
        peft_model.set_adapter("default")


def trl_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our messages as TRL's conversational rows: image parts path-less (the pixels travel beside them), text parts
    kept."""
    return [{"role": m["role"], "content": [{"type": "image", "text": None} if p["type"] == "image"
                                            else {"type": "text", "text": p["text"]} for p in m["content"]]}
            for m in messages]


@dataclass
class RunDir:
    """An opened run directory: checked, locked by the main process, and what ``--resume`` resumes from."""

    out: Path
    record: dict[str, Any]  # what a resume must match (run-start.json)
    resume_from: str | None = None
    notes: list[Finding] = field(default_factory=list)  # G4T416: damaged checkpoints --resume passed over

    @property
    def checkpoints(self) -> Path:
        """Where complete checkpoints are moved once written."""
        return self.out / "checkpoints"

    def start(self) -> None:
        """A fresh run's ``run-start.json`` (the main process writes it; a resume keeps the first run's)."""
        if is_main_process() and self.resume_from is None:
            write_run_start(self.out, self.record)


def open_run(cfg: RunConfig, *, dplan: DistributedPlan | None = None) -> RunDir:
    """Open ``cfg.out`` for a run, before any model or data is read: writable (G4T021), not in use (G4T417), for
    ``--resume`` a complete checkpoint (G4T401; damaged ones passed over, G4T416) of the same settings (G4T414,
    G4T415), else empty; then created and locked until ``train.run.train`` returns (the OS frees the lock if the
    process dies).

    Under a launcher (``dplan``) the launcher made the directory and holds the lock: only the main process checks
    the lock and takes its part. The record (what a resume must match) is computed from files only; ``start()``
    writes it when the method is ready for its first step.
    """
    main = is_main_process()
    out = Path(cfg.out)
    check_writable(out, "--out")  # before any model is loaded (G4T021)
    if main:
        check_not_in_use(out)  # G4T417, before anything is read
    run = RunDir(out, run_record(cfg, dplan.world_size if dplan else 1))
    if cfg.resume:
        done, skipped = scan_checkpoints(run.checkpoints)
        if not done:
            why = f" ({'; '.join(f'{name}: {reason}' for name, reason in skipped.items())})" if skipped else ""
            raise FindingError(finding(NO_CHECKPOINT.code, f"{run.checkpoints} holds no complete checkpoint{why}",
                                       "start the run without --resume (in a new --out)"))
        if skipped:
            run.notes.append(skipped_checkpoints_finding(run.checkpoints, skipped, done[-1]))
        check_resume(out, run.record, done[-1])  # G4T414 (other settings, beta included), G4T415 (nothing left)
        run.resume_from = str(done[-1])
    elif dplan is None:
        ensure_empty_target(out)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        lock_run_dir(out)
    return run


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/metrics.jsonl`` (none when nothing was logged: ``logging_steps`` above the run's steps)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def library_versions() -> dict[str, str]:
    """Versions that decide behaviour, for reports and manifests."""
    import accelerate
    import peft
    import transformers
    import trl

    from gemma4_tune import __version__

    return {"gemma4_tune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
            "accelerate": accelerate.__version__}


def loss_went_down(metrics: list[dict[str, Any]], window: int = 3) -> tuple[float, float]:
    """Mean loss of the first and last ``window`` logged steps."""
    losses = [m["loss"] for m in metrics if m.get("loss") is not None and math.isfinite(m["loss"])]
    if not losses:
        return float("nan"), float("nan")
    w = max(1, min(window, len(losses) // 2))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w
