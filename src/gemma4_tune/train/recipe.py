"""Supervised LoRA fine-tuning of Gemma 4, top to bottom in one readable recipe.

data (validated before any model is loaded) -> model + processor -> LoRA (exact
plan) -> batches (assistant-only labels, every processor output kept) ->
transformers Trainer with our loss (logits only at supervised positions, chunked;
per-token across gradient accumulation, failure-catalog row 26), progress, metrics and atomic checkpoints -> adapter and
report written atomically.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from itertools import compress
from pathlib import Path
from typing import Any

import torch

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, err_console
from gemma4_tune.export.manifest import write_manifest
from gemma4_tune.findings import MODEL_NOT_FOUND, Finding, FindingError, Severity, finding, has_errors, register
from gemma4_tune.io import check_writable, ensure_empty_target, write_json
from gemma4_tune.model.loss import SupervisedLoss
from gemma4_tune.model.patches import use_model_image_masks
from gemma4_tune.model.profile import ModelProfile
from gemma4_tune.model.quantization import QuantSpec, load_quantized, spec_of
from gemma4_tune.plan.adapters import (
    LoraSettings,
    check_quantization,
    prepare_model,
    quantize_experts,
    save_adapter,
)
from gemma4_tune.plan.targets import TargetPlan
from gemma4_tune.preflight import PreflightResult
from gemma4_tune.ranks import (
    barrier,
    check_not_empty,
    gather_trainable,
    is_main_process,
    local_gpu,
    under_launcher,
)
from gemma4_tune.train.callbacks import (
    AtomicCheckpointCallback,
    EvalCallback,
    GuardCallback,
    MetricsCallback,
    ProgressCallback,
    TokenCounter,
    scan_checkpoints,
    skipped_checkpoints_finding,
)
from gemma4_tune.train.distributed import DistributedPlan, check_job, check_wrap_classes, read_plan
from gemma4_tune.train.evaluate import generate_samples, pick_samples
from gemma4_tune.train.rundir import (
    check_not_in_use,
    check_resume,
    lock_run_dir,
    release_run_dir,
    run_record,
    write_run_start,
)

NOTHING_SUPERVISED = register("G4T402", Severity.ERROR, "No supervised tokens after rendering", (12,))
NO_CHECKPOINT = register("G4T401", Severity.ERROR, "--resume found no complete checkpoint")
MODALITY_WITHOUT_TOWER = register("G4T406", Severity.ERROR, "Data has a modality this model cannot read")
EVAL_OVERLAP = register("G4T407", Severity.WARNING, "Held-out data repeats training conversations")
EVAL_EMPTY = register("G4T408", Severity.ERROR, "Held-out data has no supervised token")
OPTIMIZER_UNAVAILABLE = register("G4T420", Severity.ERROR, "The optimizer cannot run on this machine")

_OPTIMIZER_NEEDS = (("bnb", "bitsandbytes"), ("paged_", "bitsandbytes"), ("lion_", "bitsandbytes"),
                    ("adamw_8bit", "bitsandbytes"), ("ademamix", "bitsandbytes"), ("adamw_torch_4bit", "torchao"),
                    ("adamw_torch_8bit", "torchao"), ("anyprecision", "torchdistx"), ("schedule_free", "schedulefree"))


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

STAGING = ".staging"


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
    probe_batch: dict[str, torch.Tensor] = field(default_factory=dict)
    parity: Any = None  # verify.peft.ReloadParity, set by api.run_training
    preflight: Any = None  # preflight.PreflightResult, None when skipped
    samples: list[Any] = field(default_factory=list)  # evaluate.Sample, base vs tuned answers
    report: dict[str, Any] = field(default_factory=dict)  # the sections of report.json, set by api.run_training
    distributed: dict[str, Any] | None = None  # the job the processes formed (strategy, world size, type)
    trained_state: dict[str, torch.Tensor] = field(default_factory=dict)  # gathered LoRA weights (sharded runs)
    dpo: dict[str, Any] = field(default_factory=dict)  # --method dpo: its preflight figures and held-out rewards
    quant: QuantSpec | None = None  # QLoRA: how the base was quantized (the model trained is that base + adapter)


class _Examples(torch.utils.data.Dataset):
    """Pre-encoded examples (dicts of tensors)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _device_and_dtype() -> tuple[str, torch.dtype]:
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
    device, dtype = _device_and_dtype()
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

    _, dtype = _device_and_dtype()
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


@dataclass
class RunSetup:
    """Everything a run needs before its first step: data, model with LoRA, batches."""

    profile: ModelProfile
    model: Any  # PeftModel
    plan: TargetPlan
    batcher: Any
    examples: list[dict[str, Any]]
    probe: dict[str, torch.Tensor]
    data: dict[str, Any]
    train_conversations: list[Any] = field(default_factory=list)
    eval_conversations: list[Any] = field(default_factory=list)
    eval_examples: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    quant: QuantSpec | None = None  # QLoRA: how the base was quantized (the manifest records it)


def prepare_run(cfg: RunConfig, *, sharded: bool = False) -> RunSetup:
    """Data (validated before any model is loaded), model and processor, LoRA, encoded examples."""
    from transformers import set_seed

    from gemma4_tune.data.collate import Gemma4Batcher, keep_supervised
    from gemma4_tune.data.records import load_conversations, load_datasets, split_conversations
    from gemma4_tune.data.template_checks import template_findings

    if not Path(cfg.model).is_dir():
        raise FindingError(finding(MODEL_NOT_FOUND.code, f"--model {cfg.model} is not a local model directory",
                                   "download the checkpoint first (weights are never fetched at run time) and "
                                   "pass its directory; `gemma4-tune tiny-model` builds a tiny one to try things"))

    # 1. Data (training and held-out), validated before any model is loaded.
    conversations, data_report = load_datasets(cfg.sources(), skip_invalid=cfg.skip_invalid)
    for source in data_report.sources:
        err_console.print(f"data: {source['summary']}")
    findings: list[Finding] = list(data_report.findings)
    if has_errors(findings):
        raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
    eval_convs: list[Any] = []
    eval_source = None
    modalities = dict(data_report.modalities)
    if cfg.eval_data:
        eval_convs, eval_report = load_conversations(cfg.eval_data, skip_invalid=cfg.skip_invalid)
        findings += eval_report.findings
        modalities = {k: n + eval_report.modalities.get(k, 0) for k, n in modalities.items()}
        eval_source = cfg.eval_data
        findings += eval_overlap(conversations, eval_convs, "conversations", "eval loss")
    elif cfg.eval_split:
        conversations, eval_convs = split_conversations(conversations, cfg.eval_split, cfg.seed)
        eval_source = f"{cfg.eval_split:g} of {cfg.data_label} (seed {cfg.seed})"
        err_console.print(f"eval: {len(eval_convs)} conversations held out, {len(conversations)} to train on")

    profile = ModelProfile.from_pretrained(cfg.model, count_parameters=False)
    missing = [(kind, tower) for kind, tower in (("image", "vision"), ("audio", "audio"))
               if modalities.get(kind) and not profile.has_part(tower)]
    if missing:
        raise FindingError(*[finding(MODALITY_WITHOUT_TOWER.code, f"{modalities[kind]} conversations "
                                     f"have {kind} parts but {profile.variant or cfg.model} has no {tower} tower",
                                     f"remove the {kind} parts (or those rows), or use a model that has the "
                                     f"{tower} tower" + (" (E2B, E4B or 12B)" if tower == "audio" else ""))
                             for kind, tower in missing])

    # 2. Model, processor and LoRA exactly where the plan says.
    check_quantization(cfg.quantize)
    check_optimizer(cfg.optimizer)
    set_seed(cfg.seed)
    model, processor, quant = load_model(cfg.model, cfg.quant_spec(), sharded=sharded)
    settings = LoraSettings(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)
    peft_model, plan = prepare_model(model, cfg.targets, settings, profile=profile)
    if quant is not None and quant.quantize_experts and profile.moe:
        quant = quantize_experts(peft_model, quant)

    # 3. Batches: assistant-only labels, media never labelled, every processor output kept.
    batcher = Gemma4Batcher(processor, revision=cfg.template_revision, max_seq_len=cfg.max_seq_len,
                            train_on=cfg.train_on)
    examples = [batcher.encode(c) for c in conversations]
    findings += template_findings(batcher, conversations, examples)  # G4T320-G4T323 (catalog rows 13, 29, 35)
    eval_examples = [batcher.encode(c) for c in eval_convs]
    eval_supervised = sum(int(e["num_supervised"]) for e in eval_examples)
    if eval_convs and eval_supervised == 0:
        raise FindingError(finding(EVAL_EMPTY.code, f"the {len(eval_convs)} held-out conversations ({eval_source}) "
                                   "have no labelled token after rendering and truncation", "hold out conversations "
                                   "with assistant answers, or raise --max-seq-len"))
    supervised = sum(int(e["num_supervised"]) for e in examples)
    truncated = sum(bool(e["truncated"]) for e in examples)
    if supervised == 0:
        raise FindingError(finding(NOTHING_SUPERVISED.code, "no token is labelled for training after rendering "
                                   f"and truncation to {cfg.max_seq_len} tokens",
                                   "raise --max-seq-len, check that assistant turns are not empty, or use "
                                   "--train-on all"))
    # Rows cut to --max-seq-len are one G4T318; rows left with no supervised token are dropped (G4T319).
    keep, length_findings = keep_supervised([*examples, *eval_examples], [c.source for c in [*conversations,
                                            *eval_convs]], cfg.max_seq_len, held_out=len(eval_examples))
    findings += length_findings
    eval_truncated = sum(bool(e["truncated"]) for e in eval_examples)
    train_keep, eval_keep = keep[:len(examples)], keep[len(examples):]
    unsupervised = {"train": train_keep.count(False), "eval": eval_keep.count(False)}
    conversations, examples = list(compress(conversations, train_keep)), list(compress(examples, train_keep))
    eval_convs, eval_examples = list(compress(eval_convs, eval_keep)), list(compress(eval_examples, eval_keep))
    probe = batcher.collate(_one_per_modality(examples))
    tokens = sum(int(e["input_ids"].shape[-1]) for e in examples)
    if cfg.packing:
        examples = batcher.pack(examples, cfg.max_seq_len)
    data = {**data_report.to_dict(), "encoded_examples": len(examples), "supervised_tokens": supervised,
            "tokens": tokens, "supervised_share": round(supervised / max(tokens, 1), 4), "truncated": truncated,
            "unsupervised_dropped": unsupervised["train"], "template_revision": batcher.revision,
            "packing": cfg.packing, "train_conversations": len(conversations), "eval_source": eval_source,
            "eval_conversations": len(eval_convs), "eval_supervised_tokens": eval_supervised,
            "eval_truncated": eval_truncated, "eval_unsupervised_dropped": unsupervised["eval"]}
    return RunSetup(profile, peft_model, plan, batcher, examples, probe, data, conversations, eval_convs,
                    eval_examples, findings, quant)


def preflight_run(cfg: RunConfig, setup: RunSetup) -> PreflightResult:
    """The preflight checks on the run's own model and a real batch (one example per modality)."""
    from gemma4_tune.preflight import masked_sample, run_preflight

    first = setup.examples[0]
    sample = masked_sample(setup.batcher.tokenizer, first["input_ids"], first["labels"])
    result = run_preflight(setup.model, setup.profile, setup.plan, setup.probe,
                           dataset_modalities=setup.data["modalities"],
                           dataset_supervised=setup.data["supervised_tokens"], sample=sample)
    result.findings[:0] = setup.findings
    return result


def _join_launch(cfg: RunConfig) -> DistributedPlan | None:
    """Under a launcher: this process's part of the plan; rank 0 alone prints. None for a single process."""
    if cfg.distributed is None:
        return None
    from gemma4_tune.model.patches import patch_accelerate_for_cpu_launch
    from gemma4_tune.train.distributed import LAUNCH_INVALID

    if not under_launcher():
        raise FindingError(finding(LAUNCH_INVALID.code, f"distributed: {cfg.distributed} is set, but this process "
                                   "was not started by a launcher", "use `gemma4-tune train --distributed ...` "
                                   "(it starts torchrun), or gemma4_tune.train.distributed.launch(cfg) from Python"))
    dplan = read_plan(cfg.out)
    if dplan.cpu:
        patch_accelerate_for_cpu_launch()
    if not is_main_process():
        console.quiet = err_console.quiet = True
    return dplan


def train(cfg: RunConfig) -> TrainResult:
    """Run one training job described by ``cfg``; return where everything went.

    Under a launcher (``--distributed``) every process runs this; rank 0 writes and reports. The run
    directory is locked from the first check to the end (G4T417 for a second run on it).
    """
    try:
        if cfg.method in ("dpo", "kto"):  # both on TRL's trainers, one implementation (train.preference)
            from gemma4_tune.train.preference import train_preference

            return train_preference(cfg)
        return _train(cfg)
    finally:
        release_run_dir(cfg.out)


def _train(cfg: RunConfig) -> TrainResult:
    """``train`` without the release of the run directory's lock."""
    from transformers.trainer_callback import PrinterCallback

    from gemma4_tune.preflight import skipped_finding
    from gemma4_tune.train.trainer import SupervisedLogitsTrainer

    started = time.perf_counter()
    dplan = _join_launch(cfg)
    main = is_main_process()
    out = Path(cfg.out)
    check_writable(out, "--out")  # before any model is loaded (G4T021)
    checkpoints = out / "checkpoints"
    if main:
        check_not_in_use(out)  # G4T417, before anything is read
    resume_from = None
    resume_notes: list[Finding] = []
    record = run_record(cfg, dplan.world_size if dplan else 1)  # what a resume must match (files only)
    if cfg.resume:
        done, skipped = scan_checkpoints(checkpoints)
        if not done:
            why = f" ({'; '.join(f'{name}: {reason}' for name, reason in skipped.items())})" if skipped else ""
            raise FindingError(finding(NO_CHECKPOINT.code, f"{checkpoints} holds no complete checkpoint{why}",
                                       "start the run without --resume (in a new --out)"))
        if skipped:
            resume_notes.append(skipped_checkpoints_finding(checkpoints, skipped, done[-1]))
        check_resume(out, record, done[-1])  # G4T414 (other settings), G4T415 (nothing left to train)
        resume_from = str(done[-1])
    elif dplan is None:
        ensure_empty_target(out)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        lock_run_dir(out)  # held until train() returns; freed by the OS if the process dies

    setup = prepare_run(cfg, sharded=bool(dplan and dplan.sharded))
    peft_model, plan, batcher, examples = setup.model, setup.plan, setup.batcher, setup.examples
    findings = [*resume_notes, *plan.findings, *setup.findings]
    if has_errors(findings):
        raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
    preflight = None
    if cfg.preflight:
        preflight = preflight_run(cfg, setup)
        if main:
            write_json(out / "preflight.json", preflight.to_dict())
        findings += preflight.findings[len(setup.findings):]  # preflight repeats the setup's findings first
        console.print(f"preflight: loss {preflight.loss:.4f}, {preflight.supervised_in_batch} supervised of "
                      f"{preflight.tokens_in_batch} tokens, {len(preflight.findings)} findings "
                      f"({preflight.seconds:.1f} s)")
        if has_errors(preflight.findings):
            raise FindingError(*[f for f in preflight.findings if f.severity is Severity.ERROR])
    else:
        findings.append(skipped_finding())
    data_summary = setup.data
    counter = TokenCounter()

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = batcher.collate(items)
        # packed rows carry no attention_mask: their real tokens are the non-pad ones
        real = batch["attention_mask"] if "attention_mask" in batch else batch["input_ids"].ne(batcher.pad_token_id)
        counter.add(int(real.sum()))
        return batch

    # 4. The Trainer, with our loss, progress, metrics and atomic checkpoints.
    staging = out / STAGING
    guard = GuardCallback(peft_model)
    callbacks = [guard, ProgressCallback(counter), MetricsCallback(out / "metrics.jsonl", counter),
                 AtomicCheckpointCallback(staging, checkpoints, cfg.save_total_limit)]
    eval_every, save_every = per_epoch_steps(cfg, len(examples), dplan.world_size if dplan else 1)
    evaluator = None
    if setup.eval_examples:
        evaluator = EvalCallback(peft_model, batcher, setup.eval_examples, every=cfg.eval_steps or eval_every,
                                 batch_size=cfg.batch_size, metrics_path=out / "metrics.jsonl", counter=counter)
        callbacks.append(evaluator)
    if dplan is not None:
        check_wrap_classes(peft_model, dplan)
    trainer = SupervisedLogitsTrainer(
        model=peft_model,
        args=training_arguments(cfg, staging, dplan, save_steps=save_every),
        train_dataset=_Examples(examples),
        data_collator=collate,
        compute_loss_func=SupervisedLoss(),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    job = check_job(trainer, dplan) if dplan is not None else None
    if job is not None:
        console.print(f"distributed: {job['world_size']} processes, {job['distributed_type']}")
    if main and resume_from is None:
        write_run_start(out, record)
    trainer.train(resume_from_checkpoint=resume_from)
    barrier()
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    findings += guard.findings

    # 5. The adapter (stock PEFT format; not when a guard stopped the run) and the run's record. Under a
    # launcher every process gathers the partitioned LoRA weights (row 23) and rank 0 writes them.
    adapter = None
    trained_state: dict[str, torch.Tensor] = {}
    if not guard.findings:
        trained_state = gather_trainable(peft_model) if dplan is not None else {}
        if trained_state:
            check_not_empty(trained_state, str(out / "adapter"))
        if main:
            adapter = save_adapter(peft_model, out / "adapter", plan=plan, overwrite=True,
                                   state_dict=trained_state or None)
            write_manifest(adapter, cfg.model, training=cfg.dump(), versions=library_versions(),
                           template_revision=batcher.revision, quantization=setup.quant)
        else:
            adapter = out / "adapter"
        barrier()
    samples = []
    if cfg.samples and adapter is not None:
        held_out = bool(setup.eval_conversations)
        picked = pick_samples(setup.eval_conversations or setup.train_conversations, cfg.samples)
        console.print(f"samples: generating {len(picked)} answers with the base and the tuned model")
        samples = generate_samples(peft_model, batcher, picked, held_out=held_out, max_new_tokens=cfg.sample_max_tokens)
    metrics = []
    if main:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        write_json(out / "run.json", {
            "config": cfg.dump(), "profile": {"variant": setup.profile.variant, "tiny": setup.profile.tiny},
            "plan": {"spec": plan.spec, "trainable": plan.trainable_by_group(), "skipped": len(plan.skipped)},
            "data": data_summary, "resumed_from": resume_from, "distributed": job, "versions": library_versions(),
        })
    return TrainResult(out=out, adapter=adapter, plan=plan, data=data_summary, metrics=metrics,
                       seconds=round(time.perf_counter() - started, 2), findings=findings,
                       resumed_from=resume_from, model=peft_model, probe_batch=setup.probe,
                       preflight=preflight, samples=samples, distributed=job,
                       trained_state=trained_state if dplan is not None and dplan.sharded else {}, quant=setup.quant)


def _one_per_modality(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first text-only, image and audio example: a fixed batch to compare models on."""
    picked: dict[str, dict[str, Any]] = {}
    for ex in examples:
        kind = "image" if "pixel_values" in ex else "audio" if "input_features" in ex else "text"
        picked.setdefault(kind, ex)
    return list(picked.values())


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
