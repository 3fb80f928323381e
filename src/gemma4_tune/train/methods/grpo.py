"""Group Relative Policy Optimization (``train --method grpo``) on TRL's GRPOTrainer: prompts, reward functions,
generation groups scored against each other; the machinery (our rendering, aligned ``mm_token_type_ids``, rewards
without the thought channel, the preflight on one generation group, the guards) is ``train.grpo``."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, err_console
from gemma4_tune.findings import Finding, FindingError, Severity, finding, has_errors
from gemma4_tune.io import figure_text, write_json
from gemma4_tune.preflight import PREFLIGHT_SKIPPED, PreflightResult
from gemma4_tune.train.base import (
    STAGING,
    Method,
    ReportSection,
    TrainResult,
    adapted_model,
    drop_trl_reference_copy,
    eval_overlap,
    library_versions,
    open_run,
    read_metrics,
    trainer_settings,
)

#: Held-out prompts scored (greedy) when no held-out data is given: the first training prompts, said so.
TRAINING_PROMPTS_SCORED = 8


@dataclass
class GRPOData:
    """The prompts to train on and the held-out ones, with what reading them found."""

    prompts: list[Any]
    eval_prompts: list[Any]
    summary: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)


class GRPO(Method):
    """GRPO: prompts (conversations or strings, with images) and reward functions; held-out reward (greedy) of the
    base and the tuned model."""

    name = "grpo"
    description = "Group Relative Policy Optimization on prompts with reward functions (TRL's GRPOTrainer)"

    def read_data(self, cfg: RunConfig) -> GRPOData:
        """The rewards (loaded, G4T516) and the prompts, training and held-out, before any model loads."""
        from gemma4_tune.data.prompts import load_prompts
        from gemma4_tune.data.records import DataSource, split_conversations
        from gemma4_tune.train.rewards import REWARD_NOT_FOUND, check_reward_specs, required_columns

        check_reward_specs(cfg.rewards)
        prompts, reports, findings = load_prompts(cfg.sources(), skip_invalid=cfg.skip_invalid)
        for report in reports:
            err_console.print(f"data: {report.summary()}")
        eval_prompts: list[Any] = []
        if cfg.eval_data:
            eval_prompts, eval_reports, eval_findings = load_prompts([DataSource(cfg.eval_data)],
                                                                     skip_invalid=cfg.skip_invalid)
            reports += eval_reports
            findings += eval_findings
            findings += eval_overlap([p.conversation() for p in prompts], [p.conversation() for p in eval_prompts],
                                     "prompts", "held-out reward")
        elif cfg.eval_split:
            views = [(p.conversation(), p) for p in prompts]
            kept, held = split_conversations([v for v, _ in views], cfg.eval_split, cfg.seed)
            by_view = {id(v): p for v, p in views}
            prompts, eval_prompts = [by_view[id(v)] for v in kept], [by_view[id(v)] for v in held]
            err_console.print(f"eval: {len(eval_prompts)} prompts held out, {len(prompts)} to train on")
        for column, spec in required_columns(cfg.rewards).items():
            missing = [p.source for p in [*prompts, *eval_prompts] if p.columns.get(column) is None]
            if missing:
                raise FindingError(finding(REWARD_NOT_FOUND.code, f"reward {spec} reads the {column!r} column, which "
                                           f"{len(missing)} prompts lack (first: {missing[0]})", f"give every row "
                                           f"a {column!r}, or name the column: --reward {spec.split(':')[0]}:COLUMN"))
        summary = {"sources": [r.to_dict() for r in reports], "prompts": len(prompts),
                   "eval_prompts": len(eval_prompts),
                   "modalities": {"image": sum(bool(p.images) for p in prompts),
                                  "text": sum(not p.images for p in prompts)},
                   "eval_source": cfg.eval_data or (f"{cfg.eval_split:g} of {cfg.data_label} (seed {cfg.seed})"
                                                    if cfg.eval_split else None)}
        return GRPOData(prompts, eval_prompts, summary, findings)

    def build_trainer(self, cfg: RunConfig, data: GRPOData, staging: Path) -> dict[str, Any]:
        """Model and LoRA as SFT prepares them, our batcher (thinking as asked), the rewards, TRL's trainer whose
        reference is the base with the adapter disabled."""
        from transformers.trainer_callback import PrinterCallback

        from gemma4_tune.data.collate import Gemma4Batcher
        from gemma4_tune.model.patches import patch_trl_compact_log_probs
        from gemma4_tune.model.profile import ModelProfile
        from gemma4_tune.train.grpo import Gemma4GRPOTrainer, grpo_config, stop_at_end_of_turn, trl_dataset
        from gemma4_tune.train.rewards import build_rewards

        patch_trl_compact_log_probs()  # log-probabilities at the completion positions only, on the CPU too
        profile = ModelProfile.from_pretrained(cfg.model, count_parameters=False)
        peft_model, plan, processor, quant = adapted_model(cfg, profile)
        tokenizer = getattr(processor, "tokenizer", processor)
        eos = stop_at_end_of_turn(peft_model, tokenizer)
        batcher = Gemma4Batcher(processor, revision=cfg.template_revision, max_seq_len=cfg.max_seq_len,
                                chat_kwargs={"enable_thinking": cfg.thinking})
        rewards = build_rewards(cfg.rewards, tokenizer)
        trainer = Gemma4GRPOTrainer(model=peft_model, reward_funcs=rewards, args=grpo_config(
            cfg, staging, trainer_settings(cfg, staging)), train_dataset=trl_dataset(data.prompts),
            processing_class=processor, batcher=batcher, prompts=[*data.prompts, *data.eval_prompts])
        trainer.remove_callback(PrinterCallback)
        drop_trl_reference_copy(peft_model)
        return {"trainer": trainer, "model": peft_model, "plan": plan, "profile": profile, "processor": processor,
                "quant": quant, "batcher": batcher, "rewards": rewards, "eos": eos, "thinking": cfg.thinking,
                "beta": cfg.beta}

    def preflight(self, cfg: RunConfig, built: dict[str, Any], data: GRPOData) -> PreflightResult:
        """One real generation group: GRPO's checks (``train.grpo.grpo_preflight``), its loss, then SFT's checks on
        the group's completions as supervised tokens (a gradient into every planned part...)."""
        from collections import defaultdict

        import torch

        from gemma4_tune.preflight import masked_sample, run_preflight
        from gemma4_tune.train.grpo import check_preflight_loss, grpo_preflight, supervised_group

        trainer = built["trainer"]
        findings, figures, group = grpo_preflight(built, data.prompts, seed=cfg.seed)
        trainer.current_gradient_accumulation_steps = cfg.grad_accum  # what the Trainer sets before each step
        with torch.no_grad():
            loss = float(trainer.compute_loss(built["model"], group))
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # the first step logs its own
        figures["grpo_loss"] = loss
        findings += check_preflight_loss(loss)
        batch = supervised_group(group)
        tokenizer = trainer._tokenizer
        keep = batch["attention_mask"][0].bool()
        sample = masked_sample(tokenizer, batch["input_ids"][0][keep], batch["labels"][0][keep])
        result = run_preflight(built["model"], built["profile"], built["plan"], batch,
                               dataset_modalities=data.summary["modalities"],
                               dataset_supervised=int(group["completion_mask"].sum()), sample=sample)
        result.findings += findings
        result.reference = figures
        return result

    def evaluate(self, built: dict[str, Any], prompts: list[Any], *, base: bool) -> dict[str, Any]:
        """Greedy completions of ``prompts`` by the tuned model (``base``: with the adapter disabled), scored."""
        import contextlib

        from gemma4_tune.train.grpo import generate_answers, score

        trainer, model = built["trainer"], built["model"]
        with model.disable_adapter() if base else contextlib.nullcontext():
            ids = generate_answers(model, built["batcher"], prompts, max_new_tokens=trainer.max_completion_length,
                                   eos=built["eos"])
        return score(built["rewards"], trainer.reward_weights.tolist(), prompts, ids, trainer._tokenizer)

    def report_section(self, cfg: RunConfig, result: TrainResult) -> ReportSection:
        """Rewards over steps, held-out reward base -> tuned, clipped ratio and KL; the GRPO plot."""
        from gemma4_tune.model.quantization import base_weights_line
        from gemma4_tune.train.grpo import grpo_plot

        steps = [m for m in result.metrics if "reward" in m and "loss" in m]
        summary: dict[str, Any] = {
            "method": self.name, "steps": steps[-1]["step"] if steps else 0,
            "reward (first -> last step)": (f"{figure_text(steps[0]['reward'], '.3f')} -> "
                                            f"{figure_text(steps[-1]['reward'], '.3f')}") if steps else "-",
            "seconds": result.seconds, "adapter": str(result.adapter or "-"),
            "resumed from": result.resumed_from or "-", **base_weights_line(result.quant)}
        evals = result.grpo.get("evals") or {}
        if evals:
            summary[f"{evals['where']} reward, greedy (base -> tuned)"] = (
                f"{figure_text(evals['base']['eval_reward'], '.3f')} -> "
                f"{figure_text(evals['tuned']['eval_reward'], '.3f')}")
        if steps:
            summary["cut at the length limit (last step)"] = figure_text(steps[-1].get("completions/clipped_ratio"),
                                                                         ".0%")
            summary["KL to the base (last step)"] = figure_text(steps[-1].get("kl"), ".3g")
        pf = result.grpo.get("preflight") or {}
        if pf:
            summary["reference = base with adapter disabled"] = "yes" if pf.get("reference_equals_base") else "NO"
        plot = grpo_plot(result.metrics, result.out / "grpo.png")
        return ReportSection(summary, {**result.grpo, "plot": plot.name if plot else None}, plot)

    def train(self, cfg: RunConfig) -> TrainResult:
        """Prompts, model and LoRA, preflight on one generation group, training with guards and checkpoints, the
        held-out reward of the base and the tuned model, the adapter."""
        from gemma4_tune.export.manifest import write_manifest
        from gemma4_tune.plan.adapters import save_adapter
        from gemma4_tune.train.callbacks import (
            AtomicCheckpointCallback,
            MetricsCallback,
            ProgressCallback,
            TokenCounter,
            append_metrics_row,
        )
        from gemma4_tune.train.grpo import GRPOGuard, eval_row, not_learning

        started = time.perf_counter()
        run = open_run(cfg)
        data = self.read_data(cfg)
        out, staging = run.out, run.out / STAGING
        built = self.build_trainer(cfg, data, staging)
        trainer, model, plan = built["trainer"], built["model"], built["plan"]
        counter = TokenCounter()
        findings = [*run.notes, *data.findings, *plan.findings]
        guard = GRPOGuard(model, beta=cfg.beta)
        for callback in (guard, ProgressCallback(counter), MetricsCallback(out / "metrics.jsonl", counter),
                         AtomicCheckpointCallback(staging, run.checkpoints, cfg.save_total_limit)):
            trainer.add_callback(callback)
        preflight = None
        if cfg.preflight:
            preflight = self.preflight(cfg, built, data)
            findings += preflight.findings
            write_json(out / "preflight.json", preflight.to_dict())
            pf = preflight.reference
            console.print(f"preflight (grpo): {pf['completions']} completions, reward {pf['reward_mean']:.3f}, "
                          f"{pf['ended_turn_share']:.0%} ended their turn, reference = base "
                          f"{pf['reference_equals_base']}, {len(preflight.findings)} findings ({pf['seconds']:.1f} s)")
        else:
            findings.append(finding(PREFLIGHT_SKIPPED.code, "preflight was skipped (--no-preflight): nothing checked "
                                    "the prompts' padding and image types, the rewards, or that the reference is the "
                                    "base", "drop --no-preflight (it costs one generation group)"))
        if has_errors(findings):
            raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
        run.start()
        trainer.counter = counter  # training's tokens only: the preflight group is not counted
        trainer.train(resume_from_checkpoint=run.resume_from)
        shutil.rmtree(staging, ignore_errors=True)
        findings += guard.findings
        stopped = has_errors(guard.findings)
        adapter = None
        evals: dict[str, Any] = {}
        samples: list[Any] = []
        if not stopped:
            adapter = save_adapter(model, out / "adapter", plan=plan, overwrite=True)
            write_manifest(adapter, cfg.model, training=cfg.dump(), versions=library_versions(),
                           template_revision=built["batcher"].revision, quantization=built["quant"])
            scored = data.eval_prompts or data.prompts[:TRAINING_PROMPTS_SCORED]
            if scored:
                console.print(f"evaluate: greedy answers to {len(scored)} prompts, base and tuned")
                base, tuned = (self.evaluate(built, scored, base=True), self.evaluate(built, scored, base=False))
                step = trainer.state.global_step
                append_metrics_row(out / "metrics.jsonl", {**eval_row(0, base), "model": "base"})
                append_metrics_row(out / "metrics.jsonl", {**eval_row(step, tuned), "model": "tuned"})
                evals = {"where": "held-out" if data.eval_prompts else "training-prompt", "prompts": len(scored),
                         "base": eval_row(0, base), "tuned": eval_row(step, tuned)}
                if data.eval_prompts:
                    findings += not_learning(base, tuned)
                samples = _samples(scored[:cfg.samples], base, tuned, held_out=bool(data.eval_prompts))
        metrics = read_metrics(out)
        write_json(out / "run.json", {"config": cfg.dump(), "method": self.name, "data": data.summary,
                                      "resumed_from": run.resume_from,
                                      "plan": {"spec": plan.spec, "trainable": plan.trainable_by_group()},
                                      "versions": library_versions()})
        return TrainResult(out=out, adapter=adapter, plan=plan, data=data.summary, metrics=metrics,
                           seconds=round(time.perf_counter() - started, 2), findings=findings,
                           resumed_from=run.resume_from, model=model, preflight=preflight,
                           samples=samples,
                           grpo={"preflight": preflight.reference if preflight else {}, "evals": evals},
                           quant=built["quant"])

    def preflight_only(self, cfg: RunConfig) -> PreflightResult:
        """``preflight --method grpo``: prompts, rewards, model, LoRA and TRL's trainer as training builds them, the
        checks on one generation group; nothing is written."""
        data = self.read_data(cfg)
        with tempfile.TemporaryDirectory(prefix="gemma4-tune-grpo-preflight-") as staging:
            built = self.build_trainer(cfg, data, Path(staging))
            result = self.preflight(cfg, built, data)
        result.findings[:0] = [*data.findings, *built["plan"].findings]
        return result


def _samples(prompts: list[Any], base: dict[str, Any], tuned: dict[str, Any], *, held_out: bool) -> list[Any]:
    """Base and tuned greedy answers beside each prompt (the report's samples table)."""
    from gemma4_tune.train.evaluate import Sample

    samples = []
    for i, prompt in enumerate(prompts):
        text = " ".join(p["text"] for p in prompt.messages[-1]["content"] if p["type"] == "text")
        reference = prompt.columns.get("answer")
        samples.append(Sample(kind="image" if prompt.images else "text", source=prompt.source, prompt=text,
                              reference="" if reference is None else str(reference), base=base["answers"][i],
                              tuned=tuned["answers"][i], held_out=held_out, tuned_stopped=tuned["ended"][i],
                              base_stopped=base["ended"][i]))
    return samples


METHOD = GRPO()
