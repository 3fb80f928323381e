"""Supervised LoRA fine-tuning of Gemma 4 (``train --method sft``, the default), top to bottom in one readable unit.

data (validated before any model is loaded) -> model + processor -> LoRA (exact
plan) -> batches (assistant-only labels, every processor output kept) -> preflight ->
transformers Trainer with our loss (logits only at supervised positions, chunked;
per-token across gradient accumulation, failure-catalog row 26), progress, metrics and atomic checkpoints -> adapter and
report written atomically.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any

import torch

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, err_console
from gemma4_tune.export.manifest import write_manifest
from gemma4_tune.findings import MODEL_NOT_FOUND, Finding, FindingError, Severity, finding, has_errors, register
from gemma4_tune.io import write_json
from gemma4_tune.model.loss import SupervisedLoss
from gemma4_tune.model.profile import ModelProfile
from gemma4_tune.model.quantization import QuantSpec, base_weights_line
from gemma4_tune.plan.adapters import (
    save_adapter,
)
from gemma4_tune.plan.targets import TargetPlan
from gemma4_tune.preflight import PreflightResult
from gemma4_tune.ranks import barrier, check_not_empty, gather_trainable, is_main_process, under_launcher
from gemma4_tune.train.base import (
    STAGING,
    Method,
    ReportSection,
    TrainResult,
    adapted_model,
    eval_overlap,
    library_versions,
    loss_went_down,
    open_run,
    per_epoch_steps,
    read_metrics,
    training_arguments,
)
from gemma4_tune.train.callbacks import (
    AtomicCheckpointCallback,
    EvalCallback,
    GuardCallback,
    MetricsCallback,
    ProgressCallback,
    TokenCounter,
)
from gemma4_tune.train.distributed import DistributedPlan, check_job, check_wrap_classes, read_plan
from gemma4_tune.train.evaluate import generate_samples, pick_samples

NOTHING_SUPERVISED = register("G4T402", Severity.ERROR, "No supervised tokens after rendering", (12,))
MODALITY_WITHOUT_TOWER = register("G4T406", Severity.ERROR, "Data has a modality this model cannot read")
EVAL_EMPTY = register("G4T408", Severity.ERROR, "Held-out data has no supervised token")


@dataclass
class Conversations:
    """SFT's data as read and validated, before any model loads: training and held-out conversations."""

    train: list[Any]
    held_out: list[Any]
    report: Any  # data.records.DataReport of the training data
    findings: list[Finding]
    eval_source: str | None
    profile: ModelProfile  # read from the model's config: which towers the data may need


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


@dataclass
class SftTrainer:
    """SFT's Trainer and the guard whose findings the run reports."""

    trainer: Any  # train.trainer.SupervisedLogitsTrainer
    guard: GuardCallback


class _Examples(torch.utils.data.Dataset):
    """Pre-encoded examples (dicts of tensors)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class SFT(Method):
    """Supervised fine-tuning: the model learns the assistant turns of conversations (text, images, audio).

    Its preflight runs on the prepared model and batches before the Trainer exists (the Trainer's construction
    reseeds), so ``train`` goes read_data -> prepare -> preflight -> build_trainer.
    """

    name = "sft"
    description = "supervised fine-tuning on conversations: the assistant turns are learned"

    def read_data(self, cfg: RunConfig) -> Conversations:
        """Training and held-out conversations (``--eval-data`` or ``--eval-split``), validated before any model is
        loaded; the model's towers must read every modality of the data (G4T406)."""
        from gemma4_tune.data.records import load_conversations, load_datasets, split_conversations

        if not Path(cfg.model).is_dir():
            raise FindingError(finding(MODEL_NOT_FOUND.code, f"--model {cfg.model} is not a local model directory",
                                       "download the checkpoint first (weights are never fetched at run time) and "
                                       "pass its directory; `gemma4-tune tiny-model` builds a tiny one to try things"))
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
        return Conversations(conversations, eval_convs, data_report, findings, eval_source, profile)

    def prepare(self, cfg: RunConfig, data: Conversations, *, sharded: bool = False) -> RunSetup:
        """Model and processor, LoRA exactly where the plan says, and the conversations encoded into examples
        (assistant-only labels, media never labelled, every processor output kept)."""

        from gemma4_tune.data.collate import Gemma4Batcher, keep_supervised
        from gemma4_tune.data.template_checks import template_findings

        conversations, eval_convs, profile = data.train, data.held_out, data.profile
        findings = list(data.findings)
        peft_model, plan, processor, quant = adapted_model(cfg, profile, sharded=sharded)

        batcher = Gemma4Batcher(processor, revision=cfg.template_revision, max_seq_len=cfg.max_seq_len,
                                train_on=cfg.train_on)
        examples = [batcher.encode(c) for c in conversations]
        findings += template_findings(batcher, conversations, examples)  # G4T320-G4T323 (catalog rows 13, 29, 35)
        eval_examples = [batcher.encode(c) for c in eval_convs]
        eval_supervised = sum(int(e["num_supervised"]) for e in eval_examples)
        if eval_convs and eval_supervised == 0:
            raise FindingError(finding(EVAL_EMPTY.code, f"the {len(eval_convs)} held-out conversations "
                                       f"({data.eval_source}) have no labelled token after rendering and truncation",
                                       "hold out conversations with assistant answers, or raise --max-seq-len"))
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
        summary = {**data.report.to_dict(), "encoded_examples": len(examples), "supervised_tokens": supervised,
                   "tokens": tokens, "supervised_share": round(supervised / max(tokens, 1), 4),
                   "truncated": truncated, "unsupervised_dropped": unsupervised["train"],
                   "template_revision": batcher.revision, "packing": cfg.packing,
                   "train_conversations": len(conversations), "eval_source": data.eval_source,
                   "eval_conversations": len(eval_convs), "eval_supervised_tokens": eval_supervised,
                   "eval_truncated": eval_truncated, "eval_unsupervised_dropped": unsupervised["eval"]}
        return RunSetup(profile, peft_model, plan, batcher, examples, probe, summary, conversations, eval_convs,
                        eval_examples, findings, quant)

    def preflight(self, cfg: RunConfig, built: RunSetup, data: Conversations) -> PreflightResult:
        """The preflight checks on the run's own model and a real batch (one example per modality). ``built`` is
        the prepared run, which holds ``data`` encoded (the findings of reading it first)."""
        from gemma4_tune.preflight import masked_sample, run_preflight

        first = built.examples[0]
        sample = masked_sample(built.batcher.tokenizer, first["input_ids"], first["labels"])
        result = run_preflight(built.model, built.profile, built.plan, built.probe,
                               dataset_modalities=built.data["modalities"],
                               dataset_supervised=built.data["supervised_tokens"], sample=sample)
        result.findings[:0] = built.findings
        return result

    def evaluate(self, cfg: RunConfig, setup: RunSetup, counter: TokenCounter,
                 every: int | None) -> EvalCallback | None:
        """Held-out loss and token accuracy, computed like the training loss; the Trainer drives the callback
        returned: the base before the first step, then every ``every`` steps and at the end. None without
        held-out data."""
        if not setup.eval_examples:
            return None
        return EvalCallback(setup.model, setup.batcher, setup.eval_examples, every=every, batch_size=cfg.batch_size,
                            metrics_path=Path(cfg.out) / "metrics.jsonl", counter=counter)

    def build_trainer(self, cfg: RunConfig, data: RunSetup, staging: Path, *,
                      dplan: DistributedPlan | None = None) -> SftTrainer:
        """The Trainer over the encoded examples of ``data`` (the prepared run): our loss, the guards, progress,
        metrics, atomic checkpoints and the held-out evaluation; under a launcher, the strategy's settings."""
        from transformers.trainer_callback import PrinterCallback

        from gemma4_tune.train.trainer import SupervisedLogitsTrainer

        out = Path(cfg.out)
        batcher = data.batcher
        counter = TokenCounter()

        def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            batch = batcher.collate(items)
            # packed rows carry no attention_mask: their real tokens are the non-pad ones
            real = batch["attention_mask"] if "attention_mask" in batch else batch["input_ids"].ne(batcher.pad_token_id)
            counter.add(int(real.sum()))
            return batch

        guard = GuardCallback(data.model)
        callbacks = [guard, ProgressCallback(counter), MetricsCallback(out / "metrics.jsonl", counter),
                     AtomicCheckpointCallback(staging, out / "checkpoints", cfg.save_total_limit)]
        eval_every, save_every = per_epoch_steps(cfg, len(data.examples), dplan.world_size if dplan else 1)
        evaluator = self.evaluate(cfg, data, counter, cfg.eval_steps or eval_every)
        if evaluator is not None:
            callbacks.append(evaluator)
        if dplan is not None:
            check_wrap_classes(data.model, dplan)
        trainer = SupervisedLogitsTrainer(
            model=data.model,
            args=training_arguments(cfg, staging, dplan, save_steps=save_every),
            train_dataset=_Examples(data.examples),
            data_collator=collate,
            compute_loss_func=SupervisedLoss(),
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)
        return SftTrainer(trainer, guard)

    def report_section(self, cfg: RunConfig, result: TrainResult) -> ReportSection:
        """Steps, loss, the held-out loss and token accuracy of the base and the tuned model, the distributed job."""
        first, last = loss_went_down(result.metrics)
        summary = {"steps": result.metrics[-1]["step"] if result.metrics else 0, "first loss": round(first, 4),
                   "last loss": round(last, 4), "seconds": result.seconds, "adapter": str(result.adapter or "-"),
                   "resumed from": result.resumed_from or "-", **base_weights_line(result.quant)}
        if result.distributed:
            summary["distributed"] = (f"{result.distributed['strategy']} on {result.distributed['world_size']} "
                                      f"processes ({result.distributed['distributed_type']})")
        evals = [m for m in result.metrics if "eval_loss" in m]
        if evals:
            summary["held-out loss (base -> tuned)"] = f"{evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f}"
            summary["held-out token accuracy (base -> tuned)"] = (f"{evals[0]['eval_accuracy']:.1%} -> "
                                                                  f"{evals[-1]['eval_accuracy']:.1%}")
        return ReportSection(summary, sections={"distributed": result.distributed})

    def train(self, cfg: RunConfig) -> TrainResult:
        """One SFT run. Under a launcher (``--distributed``) every process runs this; rank 0 writes and reports."""
        from gemma4_tune.preflight import skipped_finding

        started = time.perf_counter()
        dplan = _join_launch(cfg)
        main = is_main_process()
        run = open_run(cfg, dplan=dplan)
        out = run.out

        # 1-3. Data (validated before any model is loaded), model with LoRA, batches.
        data = self.read_data(cfg)
        setup = self.prepare(cfg, data, sharded=bool(dplan and dplan.sharded))
        peft_model, plan, batcher = setup.model, setup.plan, setup.batcher
        findings = [*run.notes, *plan.findings, *setup.findings]
        if has_errors(findings):
            raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
        preflight = None
        if cfg.preflight:
            preflight = self.preflight(cfg, setup, data)
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

        # 4. The Trainer, with our loss, progress, metrics and atomic checkpoints.
        staging = out / STAGING
        built = self.build_trainer(cfg, setup, staging, dplan=dplan)
        job = check_job(built.trainer, dplan) if dplan is not None else None
        if job is not None:
            console.print(f"distributed: {job['world_size']} processes, {job['distributed_type']}")
        run.start()
        built.trainer.train(resume_from_checkpoint=run.resume_from)
        barrier()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        findings += built.guard.findings

        # 5. The adapter (stock PEFT format; not when a guard stopped the run) and the run's record. Under a
        # launcher every process gathers the partitioned LoRA weights (row 23) and rank 0 writes them.
        adapter = None
        trained_state: dict[str, torch.Tensor] = {}
        if not built.guard.findings:
            trained_state = gather_trainable(peft_model) if dplan is not None else {}
            if trained_state:
                check_not_empty(trained_state, str(out / "adapter"))
            if main:
                adapter = save_adapter(peft_model, out / "adapter", plan=plan, overwrite=True,
                                       state_dict=trained_state or None)
                write_manifest(adapter, cfg.model, training=cfg.dump(), versions=library_versions(),
                               template_revision=batcher.revision, quantization=setup.quant,
                               data_modalities=setup.data.get("modalities"))
            else:
                adapter = out / "adapter"
            barrier()
        samples = []
        if cfg.samples and adapter is not None:
            held_out = bool(setup.eval_conversations)
            picked = pick_samples(setup.eval_conversations or setup.train_conversations, cfg.samples)
            console.print(f"samples: generating {len(picked)} answers with the base and the tuned model")
            samples = generate_samples(peft_model, batcher, picked, held_out=held_out,
                                       max_new_tokens=cfg.sample_max_tokens)
        metrics = []
        if main:
            metrics = read_metrics(out)
            write_json(out / "run.json", {
                "config": cfg.dump(), "profile": {"variant": setup.profile.variant, "tiny": setup.profile.tiny},
                "plan": {"spec": plan.spec, "trainable": plan.trainable_by_group(), "skipped": len(plan.skipped)},
                "data": setup.data, "resumed_from": run.resume_from, "distributed": job,
                "versions": library_versions(),
            })
        return TrainResult(out=out, adapter=adapter, plan=plan, data=setup.data, metrics=metrics,
                           seconds=round(time.perf_counter() - started, 2), findings=findings,
                           resumed_from=run.resume_from, model=peft_model, probe_batch=setup.probe,
                           preflight=preflight, samples=samples, distributed=job,
                           trained_state=trained_state if dplan is not None and dplan.sharded else {},
                           quant=setup.quant)

    def preflight_only(self, cfg: RunConfig) -> PreflightResult:
        """``preflight``: data, model, LoRA and the checks on a real batch, as ``train`` prepares them."""
        data = self.read_data(cfg)
        return self.preflight(cfg, self.prepare(cfg, data), data)


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


def _one_per_modality(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first text-only, image, video and audio example: a fixed batch to compare models on."""
    picked: dict[str, dict[str, Any]] = {}
    for ex in examples:
        kind = ("image" if "pixel_values" in ex else "video" if "pixel_values_videos" in ex
                else "audio" if "input_features" in ex else "text")
        picked.setdefault(kind, ex)
    return list(picked.values())


METHOD = SFT()
