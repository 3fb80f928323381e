"""Preference tuning (``train --method dpo``) on TRL's DPOTrainer, with gemma4-tune's model preparation.

The LoRA plan, the towers kept clipped and the model loading are SFT's (``train.load_model``,
``adapters.prepare_model``); the pairs are read and validated before any model loads
(``data.preference``). TRL renders prompt, chosen and rejected with the model's own chat template
through its processor, keeps every processor output in image batches, and runs one policy and one
reference forward over ``[chosen; rejected]``.

The reference is the base with the adapter disabled, never a second copy: handed a PeftModel, TRL 1.16
copies the adapter into a frozen second adapter named ``ref``; it is deleted here, so TRL's reference
context disables the adapter (``trl.trainer.utils.use_adapter`` with no name). Preflight proves it on
a real batch: with the reference as TRL computes it, step 0's chosen/rejected log-ratios are exactly
0, and with noise put into every ``lora_B`` the reference still equals the base exactly while the
policy moves (a fresh adapter changes nothing, so step 0 alone cannot tell a reference that keeps the
adapter on). Images without ``mm_token_type_ids`` on a bidirectional model are G4T505, as for SFT.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, err_console
from gemma4_tune.findings import Finding, FindingError, Severity, finding, has_errors, register
from gemma4_tune.io import check_writable, ensure_empty_target, write_json
from gemma4_tune.preflight import LOSS_NOT_FINITE, MM_TYPE_IDS_DROPPED

REFERENCE_NOT_BASE = register("G4T512", Severity.ERROR, "DPO's reference model is not the base model")
POLICY_NOT_REFERENCE = register("G4T513", Severity.ERROR, "DPO's policy differs from its reference at step 0")
DPO_AUDIO = register("G4T514", Severity.ERROR, "DPO pairs with audio, tools or tool calls")
DPO_NOT_LEARNING = register("G4T515", Severity.WARNING, "DPO did not raise held-out reward accuracy or margin")

#: Keys of TRL's DPO batch that are bookkeeping, not model inputs.
_NOT_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


# --------------------------------------------------------------------------- data


def _trl_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our messages as TRL's conversational rows: media parts become ``{"type": "image"}`` (the pixels go in
    the ``images`` column, in order), text parts stay."""
    out = []
    for message in messages:
        parts = [{"type": "image", "text": None} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                 for p in message["content"]]
        out.append({"role": message["role"], "content": parts})
    return out


def trl_dataset(pairs: list[Any]) -> Any:
    """The pairs as TRL's explicit-prompt conversational dataset (``prompt``/``chosen``/``rejected``, ``images``)."""
    from datasets import Dataset
    from PIL import Image

    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    with_images = any(pair.images for pair in pairs)
    if with_images:
        rows["images"] = []
    for pair in pairs:
        rows["prompt"].append(_trl_messages(pair.prompt))
        rows["chosen"].append(_trl_messages(pair.chosen))
        rows["rejected"].append(_trl_messages(pair.rejected))
        if with_images:
            rows["images"].append([Image.open(path).convert("RGB") for path in pair.images])
    return Dataset.from_dict(rows)


#: What a message may hold that the TRL rows (:func:`trl_dataset`) keep: the role and text/image parts.
_PASSED_KEYS = frozenset({"role", "content"})


def _not_passed(pair: Any) -> list[str]:
    """What of ``pair`` the TRL rows would not carry (audio, tools, tool calls, reasoning, train flags)."""
    messages = [*pair.prompt, *pair.chosen, *pair.rejected]
    found = sorted({key for m in messages for key in m if key not in _PASSED_KEYS})
    return (["audio"] if pair.audios else []) + (["tools"] if pair.tools else []) + found


def load_pairs(cfg: RunConfig) -> tuple[list[Any], list[Any], dict[str, Any], list[Finding]]:
    """Training and held-out pairs (``--eval-data`` or ``--eval-split``), validated before any model loads."""
    import random

    from gemma4_tune.data.preference import load_preference_data

    pairs, report, findings = load_preference_data(cfg.sources(), skip_invalid=cfg.skip_invalid)
    err_console.print(f"data: {report.summary()}")
    eval_pairs: list[Any] = []
    if cfg.eval_data:
        eval_pairs, eval_report, eval_findings = load_preference_data(cfg.eval_data, skip_invalid=cfg.skip_invalid)
        findings += eval_findings
    elif cfg.eval_split:
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        n = int(cfg.eval_split) if cfg.eval_split >= 1 else max(1, round(cfg.eval_split * len(pairs)))
        held = set(order[:n])
        eval_pairs = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
    unpassed = [(p.source, what) for p in [*pairs, *eval_pairs] if (what := _not_passed(p))]
    if unpassed:
        raise FindingError(finding(DPO_AUDIO.code, f"{len(unpassed)} preference pairs have what TRL 1.16's "
                                   f"DPOTrainer rows do not carry (first: {unpassed[0][0]}: "
                                   f"{', '.join(unpassed[0][1])}): it passes text and images to the processor, not "
                                   "audio, tools, tool calls, reasoning or per-turn train flags",
                                   "drop those pairs (or those parts), or train on them with SFT"))
    data = {**report.to_dict(), "pairs": len(pairs), "eval_pairs": len(eval_pairs),
            "eval_source": cfg.eval_data or (f"{cfg.eval_split:g} of {cfg.data_label} (seed {cfg.seed})"
                                             if cfg.eval_split else None)}
    return pairs, eval_pairs, data, findings


# --------------------------------------------------------------------------- log-probabilities as TRL computes them


def sequence_logps(model: Any, batch: dict[str, Any], *, reference: bool = False, base: bool = False
                   ) -> torch.Tensor:
    """Per-row sums of completion log-probabilities, exactly as TRL's DPO loss takes them (``fused_lm_head``),
    without gradients: the policy; ``reference``: under TRL's own reference context (``use_adapter``); ``base``:
    under PEFT's ``disable_adapter()``, the definition of the reference."""
    from trl.trainer.dpo_trainer import use_adapter

    inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    length = batch["completion_mask"].size(1) - 1
    if base:
        context = model.disable_adapter()
    elif reference:
        context = use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)
    else:
        context = contextlib.nullcontext()
    with torch.no_grad(), context:
        out = model(**inputs, labels=labels, use_cache=False, fused_lm_head=True)
    return out.log_probs[:, -length:].sum(1).float()


# --------------------------------------------------------------------------- preflight


def dpo_preflight(model: Any, profile: Any, batch: dict[str, Any], *, seed: int = 0) -> tuple[list[Finding],
                                                                                            dict[str, Any]]:
    """The DPO checks on one real batch (TRL's own, after its collator); the model is left as it was."""
    started = time.perf_counter()
    findings: list[Finding] = []
    if profile.bidirectional_attention == "vision" and "pixel_values" in batch and "mm_token_type_ids" not in batch:
        findings.append(finding(MM_TYPE_IDS_DROPPED.code, "the DPO batch has images but no mm_token_type_ids: this "
                                "model attends bidirectionally over image tokens only when it gets them (row 10)",
                                "keep every processor output in the preference collator (TRL's own does)"))
    was_training = model.training
    model.eval()
    try:
        policy = sequence_logps(model, batch, reference=False)
        reference = sequence_logps(model, batch, reference=True)
        half = policy.shape[0] // 2
        ratios = (policy - reference)
        figures: dict[str, Any] = {
            "pairs_in_batch": half, "max_abs_log_ratio_step0": float(ratios.abs().max()),
            "policy_logps": [round(float(v), 4) for v in policy],
        }
        if not torch.isfinite(policy).all() or not torch.isfinite(reference).all():
            findings.append(finding(LOSS_NOT_FINITE.code, "DPO log-probabilities on the first batch are not finite "
                                    f"(policy {policy.tolist()}, reference {reference.tolist()})",
                                    "check the data of the first batch and the dtype (bf16 on GPU, fp32 on CPU)"))
        elif not torch.equal(policy, reference):
            findings.append(finding(POLICY_NOT_REFERENCE.code, "at step 0 the policy's chosen/rejected log-ratios "
                                    f"against the reference are up to {figures['max_abs_log_ratio_step0']:.3e}, "
                                    "not 0: the adapter does not start at zero, or the reference is another model",
                                    "start from a fresh adapter (lora_B = 0) on the base the reference is"))
        probe = _reference_probe(model, batch, seed)
        figures.update(probe)
        if not probe["reference_equals_base"] or not probe["policy_moves"]:
            findings.append(finding(REFERENCE_NOT_BASE.code, "with every lora_B set to noise, the DPO reference moves "
                                    f"{probe['reference_minus_base']:.3e} from the base model (policy "
                                    f"{probe['policy_minus_base']:.3e}): the reference is not the base with the "
                                    "adapter disabled, so the loss compares the model with itself",
                                    "let the reference be the base with the adapter disabled (gemma4-tune's DPO "
                                    "does; never pass the tuned model or keep the adapter on for it)"))
    finally:
        model.train(was_training)
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return findings, figures


def _reference_probe(model: Any, batch: dict[str, Any], seed: int) -> dict[str, Any]:
    """Noise in every ``lora_B``: the reference must stay the base exactly, the policy must move; then restore."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))
    try:
        policy = sequence_logps(model, batch, reference=False)
        reference = sequence_logps(model, batch, reference=True)
        base = sequence_logps(model, batch, base=True)
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
    return {"reference_equals_base": bool(torch.equal(reference, base)),
            "reference_minus_base": float((reference - base).abs().max()),
            "policy_minus_base": float((policy - base).abs().max()),
            "policy_moves": bool((policy - base).abs().max() > 0)}


# --------------------------------------------------------------------------- the run


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


class _StepZeroEval(TrainerCallback):
    """Writes the base model's held-out rewards as the first line of metrics.jsonl (which a resume keeps)."""

    def __init__(self, row: dict[str, Any], path: Path) -> None:
        self.row, self.path = row, path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            with self.path.open("a") as handle:
                handle.write(json.dumps(self.row) + "\n")


def _eval_row(trainer: Any, step: int) -> dict[str, Any]:
    """Held-out reward accuracy (a tie counts as wrong, as TRL counts it), margin and loss at ``step``."""
    metrics = trainer.evaluate()
    return {"step": step, "eval_reward_accuracy": metrics["eval_rewards/accuracies"],
            "eval_reward_margin": metrics["eval_rewards/margins"], "eval_dpo_loss": metrics["eval_loss"],
            "eval_logps_chosen": metrics["eval_logps/chosen"], "eval_logps_rejected": metrics["eval_logps/rejected"]}


def dpo_plot(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Chosen and rejected log-probabilities, and the reward margin, over the training steps."""
    steps = [m for m in metrics if "logps/chosen" in m]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [m["step"] for m in steps]
    left.plot(x, [m["logps/chosen"] for m in steps], label="chosen")
    left.plot(x, [m["logps/rejected"] for m in steps], label="rejected")
    left.set(xlabel="step", ylabel="log-probability of the answer", title="policy log-probabilities")
    left.legend()
    right.plot(x, [m["rewards/margins"] for m in steps], label="train margin")
    evals = [m for m in metrics if "eval_reward_margin" in m]
    if evals:
        right.plot([m["step"] for m in evals], [m["eval_reward_margin"] for m in evals], "o-", label="held-out margin")
    right.set(xlabel="step", ylabel="reward margin (beta x log-ratio)", title="chosen minus rejected reward")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_trainer(cfg: RunConfig, pairs: list[Any], eval_pairs: list[Any], staging: Path) -> dict[str, Any]:
    """Model, LoRA plan and TRL's DPOTrainer whose reference is the base with the adapter disabled
    (``{"trainer", "model", "plan", "profile", "processor"}``)."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from gemma4_tune.model.profile import ModelProfile
    from gemma4_tune.plan.adapters import LoraSettings, check_quantization, prepare_model
    from gemma4_tune.train.recipe import check_optimizer, load_model, trainer_settings

    check_quantization(cfg.quantize)
    check_optimizer(cfg.optimizer)
    set_seed(cfg.seed)
    profile = ModelProfile.from_pretrained(cfg.model, count_parameters=False)
    model, processor = load_model(cfg.model, cfg.quantize)
    settings = LoraSettings(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.lora_dropout)
    peft_model, plan = prepare_model(model, cfg.targets, settings, profile=profile)
    args = DPOConfig(**trainer_settings(cfg, staging), beta=cfg.beta, max_length=cfg.max_seq_len,
                     per_device_eval_batch_size=cfg.batch_size)
    trainer = DPOTrainer(model=peft_model, ref_model=None, args=args, train_dataset=trl_dataset(pairs),
                         eval_dataset=trl_dataset(eval_pairs) if eval_pairs else None, processing_class=processor)
    trainer.remove_callback(PrinterCallback)
    if "ref" in peft_model.peft_config:  # TRL's copy of the adapter: the reference is the adapter disabled
        peft_model.delete_adapter("ref")
        peft_model.set_adapter("default")
    return {"trainer": trainer, "model": peft_model, "plan": plan, "profile": profile, "processor": processor}


def _samples(cfg: RunConfig, model: Any, processor: Any, pairs: list[Any], *, held_out: bool) -> list[Any]:
    """Greedy answers of the base and the tuned model to a few prompts, beside the chosen answer (as for SFT)."""
    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.train.evaluate import generate_samples, pick_samples

    batcher = Gemma4Batcher(processor, revision=cfg.template_revision, max_seq_len=cfg.max_seq_len)
    picked = pick_samples([pair.chosen_conversation() for pair in pairs], cfg.samples)
    console.print(f"samples: generating {len(picked)} answers with the base and the tuned model")
    return generate_samples(model, batcher, picked, held_out=held_out, max_new_tokens=cfg.sample_max_tokens)


def count_tokens(trainer: Any, counter: Any) -> None:
    """Count the real tokens of every batch TRL's collator makes (the progress and metrics read them)."""
    collator = trainer.data_collator

    def counted(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(items)
        counter.add(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counted


def probe_batch(trainer: Any) -> dict[str, Any]:
    """A real batch through TRL's collator: the first pair with images and the first without, where the data
    has them (so every check sees each kind), on the model's device."""
    data = trainer.train_dataset
    images = data["images"] if "images" in data.column_names else [[]] * len(data)
    picked = [i for i in (next((i for i, m in enumerate(images) if m), None),
                          next((i for i, m in enumerate(images) if not m), None)) if i is not None]
    return trainer._prepare_inputs(trainer.data_collator([data[i] for i in picked]))


def train_dpo(cfg: RunConfig) -> Any:
    """One DPO run: pairs, model and LoRA, preflight, training with checkpoints, held-out rewards, the adapter."""
    from gemma4_tune.export.manifest import write_manifest
    from gemma4_tune.plan.adapters import save_adapter
    from gemma4_tune.train.callbacks import (
        AtomicCheckpointCallback,
        GuardCallback,
        MetricsCallback,
        ProgressCallback,
        TokenCounter,
        scan_checkpoints,
    )
    from gemma4_tune.train.recipe import NO_CHECKPOINT, STAGING, TrainResult, library_versions
    from gemma4_tune.train.rundir import check_not_in_use, lock_run_dir

    started = time.perf_counter()
    out = Path(cfg.out)
    check_writable(out, "--out")
    check_not_in_use(out)
    checkpoints = out / "checkpoints"
    resume_from = None
    if cfg.resume:
        done, _ = scan_checkpoints(checkpoints)
        if not done:
            raise FindingError(finding(NO_CHECKPOINT.code, f"{checkpoints} holds no complete checkpoint",
                                       "start the run without --resume (in a new --out)"))
        resume_from = str(done[-1])
    else:
        ensure_empty_target(out)
    out.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out)

    pairs, eval_pairs, data, findings = load_pairs(cfg)
    counter = TokenCounter()
    staging = out / STAGING
    built = build_trainer(cfg, pairs, eval_pairs, staging)
    trainer, peft_model, plan, profile = built["trainer"], built["model"], built["plan"], built["profile"]
    findings += plan.findings
    guard = GuardCallback(peft_model)
    for callback in (guard, ProgressCallback(counter), MetricsCallback(out / "metrics.jsonl", counter),
                     AtomicCheckpointCallback(staging, checkpoints, cfg.save_total_limit)):
        trainer.add_callback(callback)
    probe = probe_batch(trainer)
    count_tokens(trainer, counter)
    preflight_findings, preflight = ([], {}) if not cfg.preflight else dpo_preflight(peft_model, profile, probe,
                                                                                     seed=cfg.seed)
    findings += preflight_findings
    if preflight:
        write_json(out / "preflight.json", {**preflight, "findings": [f.to_dict() for f in preflight_findings]})
        console.print(f"preflight (dpo): step-0 log-ratio {preflight['max_abs_log_ratio_step0']:.1e}, reference = "
                      f"base {preflight['reference_equals_base']}, {len(preflight_findings)} findings")
    if has_errors(findings):
        raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
    if eval_pairs and resume_from is None:
        trainer.add_callback(_StepZeroEval(_eval_row(trainer, 0), out / "metrics.jsonl"))
    trainer.train(resume_from_checkpoint=resume_from)
    shutil.rmtree(staging, ignore_errors=True)
    findings += guard.findings
    evals: list[dict[str, Any]] = []
    if eval_pairs:
        with (out / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(_eval_row(trainer, trainer.state.global_step)) + "\n")
        evals = [row for row in _metrics(out) if "eval_reward_accuracy" in row]
        first, last = evals[0], evals[-1]
        # "did not rise" also when a figure is NaN: a comparison with NaN is never a rise
        if (not last["eval_reward_accuracy"] > first["eval_reward_accuracy"]
                and not last["eval_reward_margin"] > first["eval_reward_margin"]):
            findings.append(finding(DPO_NOT_LEARNING.code, f"held-out reward accuracy {first['eval_reward_accuracy']:.1%} "
                                    f"-> {last['eval_reward_accuracy']:.1%}, margin {first['eval_reward_margin']:.3f} -> "
                                    f"{last['eval_reward_margin']:.3f}: the tuned model does not prefer the chosen "
                                    "answers more than the base", "train longer or with a higher --lr or --beta, "
                                    "and check that chosen and rejected differ in what you want learned"))
    adapter = None
    samples = []
    if not guard.findings:
        adapter = save_adapter(peft_model, out / "adapter", plan=plan, overwrite=True)
        write_manifest(adapter, cfg.model, training=cfg.dump(), versions=library_versions(), template_revision=None)
        if cfg.samples:
            samples = _samples(cfg, peft_model, built["processor"], eval_pairs or pairs, held_out=bool(eval_pairs))
    metrics = _metrics(out)
    write_json(out / "run.json", {"config": cfg.dump(), "method": "dpo", "data": data, "resumed_from": resume_from,
                                  "plan": {"spec": plan.spec, "trainable": plan.trainable_by_group()},
                                  "versions": library_versions()})
    result = TrainResult(out=out, adapter=adapter, plan=plan, data=data, metrics=metrics,
                         seconds=round(time.perf_counter() - started, 2), findings=findings,
                         resumed_from=resume_from, model=peft_model, probe_batch={}, preflight=None, samples=samples,
                         distributed=None, trained_state={}, dpo={"preflight": preflight, "evals": evals})
    return result


def dpo_summary(result: Any) -> dict[str, Any]:
    """The report's result lines for a DPO run."""
    steps = [m for m in result.metrics if "loss" in m]
    summary: dict[str, Any] = {"method": "dpo", "steps": steps[-1]["step"] if steps else 0,
                               "first loss": round(steps[0]["loss"], 4) if steps else None,
                               "last loss": round(steps[-1]["loss"], 4) if steps else None,
                               "seconds": result.seconds, "adapter": str(result.adapter or "-"),
                               "resumed from": result.resumed_from or "-"}
    evals = result.dpo["evals"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        summary["held-out reward accuracy (base -> tuned)"] = (f"{first['eval_reward_accuracy']:.1%} -> "
                                                               f"{last['eval_reward_accuracy']:.1%}")
        summary["held-out reward margin (base -> tuned)"] = (f"{first['eval_reward_margin']:.3f} -> "
                                                             f"{last['eval_reward_margin']:.3f}")
    pf = result.dpo["preflight"]
    if pf:
        summary["step-0 log-ratio (policy vs reference)"] = f"{pf['max_abs_log_ratio_step0']:.1e}"
        summary["reference = base with adapter disabled"] = ("yes" if pf["reference_equals_base"] else "NO")
    return summary


__all__ = ["build_trainer", "count_tokens", "dpo_plot", "dpo_preflight", "dpo_summary", "load_pairs", "probe_batch",
           "sequence_logps", "train_dpo", "trl_dataset"]
