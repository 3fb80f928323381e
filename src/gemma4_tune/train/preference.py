"""What preference tuning shares: ``train --method dpo`` on TRL's DPOTrainer and ``train --method kto`` on TRL's
KTOTrainer, with gemma4-tune's model preparation. :class:`PreferenceMethod` is the run of both; the units
``train/methods/dpo.py`` and ``kto.py`` give it their data rows, TRL trainer and config, held-out figures and
report lines.

The LoRA plan, the towers kept clipped and the model loading are SFT's (``train.base.load_model``,
``plan.adapters.prepare_model``); the pairs are read and validated before any model loads
(``data.preference``). TRL renders prompt, chosen and rejected with the model's own chat template
through its processor, token for token as ``Gemma4Batcher`` renders the same conversations (text and
image pairs; tests/test_dpo.py), keeps every processor output in image batches, and runs one policy
and one reference forward over ``[chosen; rejected]``. The answers are supervised as in SFT: up to and
including their end-of-turn token (``end_answers_at_end_of_turn``).

The reference is the base with the adapter disabled, never a second copy: handed a PeftModel, TRL 1.16
copies the adapter into a frozen second adapter named ``ref``; it is deleted here, so TRL's reference
context disables the adapter (``trl.trainer.utils.use_adapter`` with no name). Preflight proves it on
a real batch: with the reference as TRL computes it, step 0's chosen/rejected log-ratios are exactly
0, and with noise put into every ``lora_B`` the reference still equals the base exactly while the
policy moves (a fresh adapter changes nothing, so step 0 alone cannot tell a reference that keeps the
adapter on). Before that, the DPO batch goes through SFT's own preflight (``preflight_pairs``): a
gradient into every planned tower, a finite loss, supervised answers, ``mm_token_type_ids`` (G4T505)...
"""

from __future__ import annotations

import contextlib
import shutil
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, err_console
from gemma4_tune.data.chat import END_OF_TURN
from gemma4_tune.findings import Finding, FindingError, Severity, finding, has_errors, register
from gemma4_tune.io import figure_text, write_json
from gemma4_tune.model.loss import IGNORE_INDEX
from gemma4_tune.model.quantization import base_weights_line
from gemma4_tune.preflight import LOSS_NOT_FINITE, PREFLIGHT_SKIPPED, PreflightResult
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
    trl_messages,
)
from gemma4_tune.train.callbacks import append_metrics_row, eval_interval

REFERENCE_NOT_BASE = register("G4T512", Severity.ERROR, "DPO/KTO reference model is not the base model")
POLICY_NOT_REFERENCE = register("G4T513", Severity.ERROR, "DPO/KTO policy differs from its reference at step 0")
DPO_AUDIO = register("G4T514", Severity.ERROR, "DPO/KTO pairs with audio, tools or tool calls")
DPO_NOT_LEARNING = register("G4T515", Severity.WARNING, "DPO/KTO did not raise held-out reward accuracy or margin")
PAIRS_CUT_AWAY = register("G4T530", Severity.ERROR, "Every DPO/KTO row is cut away by --max-seq-len", (42,))

#: Keys of TRL's DPO and KTO batches that are bookkeeping (or KTO's mismatched KL rows), not model inputs.
_NOT_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps", "label", "ref_logps", "ref_KL_logps",
               "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids", "KL_mm_token_type_ids")


def _trl_module(batch: dict[str, Any]) -> Any:
    """The TRL trainer module whose reference context a batch is computed under: KTO's batches carry labels."""
    from trl.trainer import dpo_trainer, kto_trainer

    return kto_trainer if "label" in batch else dpo_trainer


# --------------------------------------------------------------------------- data


def trl_dataset(pairs: list[Any]) -> Any:
    """The pairs as TRL's explicit-prompt conversational dataset (``prompt``/``chosen``/``rejected``, ``images``),
    each row's ``source`` beside (``file:line``, TRL passes it through: what :func:`trained_rows` names rows by)."""
    from datasets import Dataset
    from PIL import Image

    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": [], "source": []}
    with_images = any(pair.images for pair in pairs)
    if with_images:
        rows["images"] = []
    for pair in pairs:
        rows["prompt"].append(trl_messages(pair.prompt))
        rows["chosen"].append(trl_messages(pair.chosen))
        rows["rejected"].append(trl_messages(pair.rejected))
        rows["source"].append(pair.source or f"#{pair.source_row}")
        if with_images:
            rows["images"].append([Image.open(path).convert("RGB") for path in pair.images])
    return Dataset.from_dict(rows)


#: What a message may hold that the TRL rows (:func:`trl_dataset`) keep: the role and text/image parts.
_PASSED_KEYS = frozenset({"role", "content"})


def _not_passed(pair: Any) -> list[str]:
    """What of ``pair`` the TRL rows would not carry (audio, tools, tool calls, reasoning, train flags)."""
    found = sorted({key for m in pair.messages for key in m if key not in _PASSED_KEYS})
    return (["audio"] if pair.audios else []) + (["tools"] if pair.tools else []) + found


def _as_conversation(pair: Any) -> Any:
    """A pair (prompt, chosen, rejected) or an unpaired answer as one conversation: what identity means for the
    held-out split."""
    from gemma4_tune.data.records import Conversation

    return Conversation(messages=pair.messages, tools=pair.tools, source=pair.source)


# --------------------------------------------------------------------------- log-probabilities as TRL computes them


def as_supervised(batch: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPO or KTO batch as a supervised one: the same model inputs (KTO's KL rows left out), labels on the
    answers (chosen and rejected)."""
    inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
    return {**inputs, "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)}


def sequence_logps(model: Any, batch: dict[str, Any], *, reference: bool = False, base: bool = False
                   ) -> torch.Tensor:
    """Per-row sums of completion log-probabilities, exactly as TRL's DPO and KTO losses take them
    (``fused_lm_head``), without gradients: the policy; ``reference``: under the trainer's own reference context
    (``use_adapter`` of TRL's DPO or KTO module); ``base``: under PEFT's ``disable_adapter()``, the definition of
    the reference."""
    use_adapter = _trl_module(batch).use_adapter
    inputs = as_supervised(batch)
    labels = inputs.pop("labels")
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
    """DPO's (or KTO's) own checks on one real batch (TRL's, after its collator): the reference; the model is left
    as it was."""
    name = "KTO" if "label" in batch else "DPO"
    started = time.perf_counter()
    findings: list[Finding] = []
    was_training = model.training
    model.eval()
    try:
        policy = sequence_logps(model, batch, reference=False)
        reference = sequence_logps(model, batch, reference=True)
        half = policy.shape[0] // 2
        ratios = (policy - reference)
        figures: dict[str, Any] = {
            **({"completions_in_batch": policy.shape[0]} if name == "KTO" else {"pairs_in_batch": half}),
            "max_abs_log_ratio_step0": float(ratios.abs().max()),
            "policy_logps": [round(float(v), 4) for v in policy],
        }
        if not torch.isfinite(policy).all() or not torch.isfinite(reference).all():
            findings.append(finding(LOSS_NOT_FINITE.code, f"{name} log-probabilities on the first batch are not finite "
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
            findings.append(finding(REFERENCE_NOT_BASE.code, f"with every lora_B set to noise, the {name} reference moves "
                                    f"{probe['reference_minus_base']:.3e} from the base model (policy "
                                    f"{probe['policy_minus_base']:.3e}): the reference is not the base with the "
                                    "adapter disabled, so the loss compares the model with itself",
                                    "let the reference be the base with the adapter disabled (gemma4-tune's "
                                    f"{name} does; never pass the tuned model or keep the adapter on for it)"))
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


def answer_tokens(trainer: Any, batch: dict[str, Any]) -> int:
    """Answer tokens (chosen and rejected) in the training data as TRL tokenized it; the batch's where TRL
    tokenizes image rows only in its collator."""
    data = trainer.train_dataset
    if {"chosen_ids", "rejected_ids"} <= set(data.column_names):
        return sum(len(ids) for column in ("chosen_ids", "rejected_ids") for ids in data[column])
    if "completion_ids" in data.column_names:  # KTO's text rows
        return sum(len(ids) for ids in data["completion_ids"])
    return int(batch["completion_mask"].sum())


def preflight_pairs(built: dict[str, Any], batch: dict[str, Any], data: dict[str, Any], *, seed: int = 0
                    ) -> PreflightResult:
    """SFT's preflight on the DPO or KTO batch (targets wrapped, a gradient into every planned tower, finite loss,
    answers supervised, mm_token_type_ids, attention, KV sharing...), then the reference checks."""
    from gemma4_tune.preflight import masked_sample, run_preflight

    supervised = as_supervised(batch)
    tokenizer = getattr(built["processor"], "tokenizer", built["processor"])
    keep = batch["attention_mask"][0].bool()  # the first pair's chosen row, without its padding
    sample = masked_sample(tokenizer, supervised["input_ids"][0][keep], supervised["labels"][0][keep])
    result = run_preflight(built["model"], built["profile"], built["plan"], supervised,
                           dataset_modalities=data.get("modalities") or {},
                           dataset_supervised=answer_tokens(built["trainer"], batch), sample=sample)
    if not has_errors(result.findings):  # on a batch that cannot train, the reference checks say nothing more
        findings, result.reference = dpo_preflight(built["model"], built["profile"], batch, seed=seed)
        result.findings += findings
    return result


# --------------------------------------------------------------------------- the run


class HeldOutRewards(TrainerCallback):
    """Held-out reward figures into ``metrics.jsonl`` (``row``: the method's, from TRL's evaluation metrics): the
    base's before the first step, every ``every`` steps (a quarter of the run by default, as SFT's held-out loss)
    and at the end.

    Each ``trainer.evaluate()`` reaches :meth:`on_evaluate`; the step-0 row waits for ``on_train_begin``,
    after which a fresh run's metrics file exists (a resume keeps the rows up to its checkpoint).
    """

    def __init__(self, path: Path, every: int | None,
                 row: Callable[[dict[str, float], int], dict[str, Any]]) -> None:
        self.path, self.every, self.row = path, every, row
        self.pending: dict[str, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.every = eval_interval(self.every, state.max_steps)
        if self.pending is not None and state.global_step == 0:
            self._write(self.pending)
        self.pending = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            control.should_evaluate = True

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        row = self.row(metrics or {}, state.global_step)
        if state.global_step == 0:  # before training (the state train() starts is a new one)
            self.pending = row
        else:
            self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        append_metrics_row(self.path, row)


def _rose(first: dict[str, Any], last: dict[str, Any], key: str) -> bool:
    """Whether a held-out figure rose; a NaN (null in metrics.jsonl) or missing one never did."""
    before, after = first.get(key), last.get(key)
    return before is not None and after is not None and after > before


def not_learning(first: dict[str, Any], last: dict[str, Any]) -> list[Finding]:
    """G4T515 when neither the held-out reward accuracy (DPO's; KTO has none) nor the margin rose."""
    accuracy = "eval_reward_accuracy" in last
    if (accuracy and _rose(first, last, "eval_reward_accuracy")) or _rose(first, last, "eval_reward_margin"):
        return []
    said = (f"reward accuracy {figure_text(first['eval_reward_accuracy'], '.1%')} -> "
            f"{figure_text(last['eval_reward_accuracy'], '.1%')}, " if accuracy else "")
    return [finding(DPO_NOT_LEARNING.code, f"held-out {said}{'margin' if accuracy else 'reward margin'} "
                    f"{figure_text(first['eval_reward_margin'], '.3f')} -> "
                    f"{figure_text(last['eval_reward_margin'], '.3f')}: the tuned model does not prefer the chosen "
                    "answers more than the base", "train longer or with a higher --lr or --beta, and check that "
                    "chosen and rejected differ in what you want learned")]


def dpo_plot(metrics: list[dict[str, Any]], path: Path) -> Path | None:  # DPO's and KTO's
    """Chosen and rejected log-probabilities, and the reward margin, over the training steps. Each curve has the
    steps that log it: a KTO batch of one label logs no figure of the other, nor a margin."""
    if not any("logps/chosen" in m or "logps/rejected" in m for m in metrics):
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def curve(key: str) -> tuple[list[int], list[float]]:
        steps = [m for m in metrics if key in m]
        return [m["step"] for m in steps], [m[key] for m in steps]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(*curve("logps/chosen"), label="chosen")
    left.plot(*curve("logps/rejected"), label="rejected")
    left.set(xlabel="step", ylabel="log-probability of the answer", title="policy log-probabilities")
    left.legend()
    right.plot(*curve("rewards/margins"), label="train margin")
    evals = [m for m in metrics if "eval_reward_margin" in m]
    if evals:
        right.plot([m["step"] for m in evals], [m["eval_reward_margin"] for m in evals], "o-", label="held-out margin")
    right.set(xlabel="step", ylabel="reward margin (beta x log-ratio)", title="chosen minus rejected reward")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _samples(cfg: RunConfig, model: Any, processor: Any, pairs: list[Any], *, held_out: bool) -> list[Any]:
    """Greedy answers of the base and the tuned model to a few prompts, beside the chosen answer (as for SFT)."""
    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.train.evaluate import generate_samples, pick_samples

    batcher = Gemma4Batcher(processor, revision=cfg.template_revision, max_seq_len=cfg.max_seq_len)
    desirable = [pair.chosen_conversation() for pair in pairs if getattr(pair, "label", True)]  # KTO's unpaired
    picked = pick_samples(desirable, cfg.samples)
    console.print(f"samples: generating {len(picked)} answers with the base and the tuned model")
    return generate_samples(model, batcher, picked, held_out=held_out, max_new_tokens=cfg.sample_max_tokens)


def end_answers_at_end_of_turn(collator: Any, end_of_turn: int) -> Any:
    """TRL's collator with SFT's supervision rule: an answer ends with its end-of-turn token.

    TRL renders prompt and answers with the model's own template, token for token as ``Gemma4Batcher`` does,
    but also supervises what the template writes after the end of turn (a newline the model never has to
    produce: generation stops at ``<turn|>``); those positions leave the completion mask here (and KTO's
    ``KL_completion_mask`` of its mismatched rows).
    """

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(items)
        for prefix in ("", "KL_"):
            if f"{prefix}completion_mask" not in batch:
                continue
            ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
            positions = torch.arange(ids.shape[1], device=ids.device)
            last = torch.where((ids == end_of_turn) & mask.bool(), positions, -1).max(dim=1).values
            after = (positions[None, :] > last[:, None]) & (last[:, None] >= 0)
            batch[f"{prefix}completion_mask"] = mask.masked_fill(after, 0)
        return batch

    return collate


def count_tokens(trainer: Any, counter: Any) -> None:
    """Count the real tokens of every batch TRL's collator makes (the progress and metrics read them)."""
    collator = trainer.data_collator

    def counted(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(items)
        counter.add(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counted


def _full_lengths(data: Any, collator: Any) -> dict[str, tuple[int, int]]:
    """Each row TRL kept, by source: (prompt tokens, prompt + longest answer tokens), untruncated.

    Text rows as TRL tokenized them (``prompt_ids`` and ``chosen_ids`` / ``rejected_ids`` / ``completion_ids``);
    image rows, which TRL tokenizes only in its collator, through that collator one at a time without its
    ``max_length``."""
    if "prompt_ids" in data.column_names:
        answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in data.column_names]
        columns = {c: data[c] for c in ("source", "prompt_ids", *answers)}
        return {source: (len(prompt), len(prompt) + max(len(columns[c][k]) for c in answers))
                for k, (source, prompt) in enumerate(zip(columns["source"], columns["prompt_ids"], strict=True))}
    import dataclasses

    whole = dataclasses.replace(collator, max_length=None)
    lengths = {}
    for k in range(len(data)):
        row = data[k]
        batch = whole([dict(row)])
        lengths[row["source"]] = (int(batch["completion_mask"][0].argmax()),
                                  int(batch["attention_mask"].sum(dim=1).max()))
    return lengths


def trained_rows(given: Any, data: Any, collator: Any, max_length: int, *, what: str, held_out: bool = False
                 ) -> tuple[dict[str, Any], list[Finding]]:
    """What of the rows given to TRL (``given``) it trains on (``data``, after its preprocessing), at
    ``--max-seq-len`` ``max_length`` (failure catalog row 42).

    TRL cuts each sequence to ``max_length`` in its collator, an answer cut with it (no ``<turn|>`` left to learn):
    one G4T318 counts those rows, with the longest. It drops text rows whose prompt alone fills ``max_length``
    ("Dropping fully truncated examples"); image rows whose prompt fills it stay, with no answer token left: one
    G4T319 counts both. Nothing left to train on (or, ``held_out``, to evaluate) is G4T530, an error. ``what``
    names the rows ("pairs", "answers"). Returns the figures (``given``, ``trained``, ``truncated``,
    ``fully_truncated``, ``longest``) and the findings.
    """
    from collections import Counter

    from gemma4_tune.data.collate import ROWS_TRUNCATED, ROWS_UNSUPERVISED

    lengths = _full_lengths(data, collator)
    missing = Counter(given["source"]) - Counter(data["source"])  # TRL's drops
    dropped = [source for source in given["source"] if missing[source]]
    empty = dropped + [source for source, (prompt, _) in lengths.items() if prompt >= max_length]
    cut = [source for source, (prompt, full) in lengths.items() if full > max_length and prompt < max_length]
    longest = max((full for _, full in lengths.values()), default=0)
    figures = {"given": len(given), "trained": len(given) - len(empty), "truncated": len(cut),
               "fully_truncated": len(empty), "dropped_by_trl": len(dropped), "longest": longest}
    side = "held-out" if held_out else "training"
    findings: list[Finding] = []
    if cut:
        first = max(cut, key=lambda source: lengths[source][1])
        findings.append(finding(
            ROWS_TRUNCATED.code,
            f"{len(cut)} of {len(given)} {side} {what} are longer than --max-seq-len {max_length} tokens and cut to "
            "that length by TRL: the end of their answers, <turn|> with it, is not trained on (the longest, "
            f"{first}, has {lengths[first][1]} tokens; failure catalog row 42)",
            f"raise --max-seq-len (to {lengths[first][1]} to keep every {what[:-1]} whole; memory grows with it), or "
            f"shorten those {what}", rows=len(cut), longest=lengths[first][1], longest_row=first, split=side,
        ))
    if len(empty) == len(given):
        findings.append(finding(
            PAIRS_CUT_AWAY.code,
            f"all {len(given)} {side} {what} have a prompt of --max-seq-len {max_length} tokens or more: nothing of "
            f"their answers is left to {'evaluate' if held_out else 'train'} on (the first: {empty[0]}; failure "
            "catalog row 42)",
            f"raise --max-seq-len above the prompts' length, or shorten the prompts of these {what}",
            rows=len(empty), first_row=empty[0], split=side,
        ))
    elif empty:
        how = (f"TRL drops {len(dropped)}" if len(dropped) == len(empty) else
               f"TRL drops {len(dropped)} and trains {len(empty) - len(dropped)} image rows on no answer token")
        findings.append(finding(
            ROWS_UNSUPERVISED.code,
            f"{len(empty)} of {len(given)} {side} {what} have a prompt of --max-seq-len {max_length} tokens or more, "
            f"so no answer token is left: {how} (the first: {empty[0]}; failure catalog row 42); "
            f"{figures['trained']} {what} are {'evaluated' if held_out else 'trained'}",
            "raise --max-seq-len above those prompts' length, or shorten their prompts",
            rows=len(empty), first_row=empty[0], split=side,
        ))
    return figures, findings


def probe_batch(trainer: Any) -> dict[str, Any]:
    """A real batch through TRL's collator: the first pair with images and the first without, where the data
    has them (so every check sees each kind), on the model's device. KTO's rows are answers: the batch also has a
    chosen (desirable) and a rejected one."""
    data = trainer.train_dataset
    images = data["images"] if "images" in data.column_names else [[]] * len(data)
    picked = [i for i in (next((i for i, m in enumerate(images) if m), None),
                          next((i for i, m in enumerate(images) if not m), None)) if i is not None]
    if "label" in data.column_names:
        labels = data["label"]
        picked += [next(i for i, label in enumerate(labels) if label is want)
                   for want in (True, False) if want not in {labels[i] for i in picked} and want in labels]
    return trainer._prepare_inputs(trainer.data_collator([data[i] for i in picked]))




def rows_line(rows: dict[str, Any]) -> str:
    """What TRL trained of the rows given (:func:`trained_rows`): "258 of 300 (42 cut to --max-seq-len, ...)"."""
    said = [f"{rows['truncated']} cut to --max-seq-len"] if rows["truncated"] else []
    if rows["fully_truncated"]:
        said.append(f"{rows['fully_truncated']} with no answer token left ({rows['dropped_by_trl']} dropped by TRL)")
    return f"{rows['trained']} of {rows['given']}" + (f" ({', '.join(said)})" if said else "")


def margin_line(first: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
    """The report's held-out reward margin line, base -> tuned (DPO's and KTO's)."""
    return {"held-out reward margin (base -> tuned)": f"{figure_text(first['eval_reward_margin'], '.3f')} -> "
                                                      f"{figure_text(last['eval_reward_margin'], '.3f')}"}


@dataclass
class PreferenceData:
    """Preference pairs as read and validated, before any model loads."""

    pairs: list[Any]
    eval_pairs: list[Any]
    summary: dict[str, Any]  # the data's figures (report.json "data")
    findings: list[Finding]


class PreferenceMethod(Method):
    """A preference method on a TRL trainer (DPO, KTO): the parts both run, over the unit's own ``rows`` (TRL's
    dataset of the pairs), ``trl_trainer`` (its config and trainer classes), ``rewards_row`` (its held-out figures)
    and ``held_out_summary`` (its report lines). ``unpaired``: the unit reads unpaired rows (an answer and its
    label) beside pairs; ``unit_rows`` names the rows of its TRL dataset."""

    unpaired = False
    unit_rows = "pairs"

    @abstractmethod
    def rows(self, pairs: list[Any]) -> Any:
        """The pairs as the rows of the unit's TRL trainer (a ``datasets.Dataset``)."""

    @abstractmethod
    def trl_trainer(self) -> tuple[type, type]:
        """The unit's TRL config and trainer classes (imported on use: TRL is slow to import)."""

    @abstractmethod
    def rewards_row(self, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """The held-out figures at ``step`` (a metrics.jsonl row) from TRL's evaluation metrics."""

    @abstractmethod
    def held_out_summary(self, first: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
        """The report's held-out lines, base (``first``) -> tuned (``last``)."""

    def read_data(self, cfg: RunConfig) -> PreferenceData:
        """Training and held-out pairs (``--eval-data`` or ``--eval-split``), validated before any model loads.

        ``--eval-split`` holds pairs out as SFT holds out conversations (seeded, identical pairs on one side);
        held-out pairs that repeat training pairs are G4T407, as for SFT.
        """
        from gemma4_tune.data.preference import load_preference_data
        from gemma4_tune.data.records import split_conversations

        pairs, report, findings = load_preference_data(cfg.sources(), skip_invalid=cfg.skip_invalid,
                                                       unpaired=self.unpaired)
        err_console.print(f"data: {report.summary()}")
        eval_pairs: list[Any] = []
        if cfg.eval_data:
            eval_pairs, eval_report, eval_findings = load_preference_data(cfg.eval_data,
                                                                          skip_invalid=cfg.skip_invalid,
                                                                          unpaired=self.unpaired)
            findings += eval_findings
            findings += eval_overlap([_as_conversation(p) for p in pairs], [_as_conversation(p) for p in eval_pairs],
                                     "preference pairs", "held-out reward figures")
        elif cfg.eval_split:
            by_view = [(_as_conversation(pair), pair) for pair in pairs]
            kept, held = split_conversations([view for view, _ in by_view], cfg.eval_split, cfg.seed)
            pair_of = {id(view): pair for view, pair in by_view}
            pairs, eval_pairs = [pair_of[id(v)] for v in kept], [pair_of[id(v)] for v in held]
            err_console.print(f"eval: {len(eval_pairs)} pairs held out, {len(pairs)} to train on")
        unpassed = [(p.source, what) for p in [*pairs, *eval_pairs] if (what := _not_passed(p))]
        if unpassed:
            raise FindingError(finding(DPO_AUDIO.code, f"{len(unpassed)} preference pairs have what TRL 1.16's "
                                       f"DPOTrainer and KTOTrainer rows do not carry (first: {unpassed[0][0]}: "
                                       f"{', '.join(unpassed[0][1])}): it passes text and images to the processor, "
                                       "not audio, tools, tool calls, reasoning or per-turn train flags",
                                       "drop those pairs (or those parts), or train on them with SFT"))
        summary = {**report.to_dict(), "pairs": len(pairs), "eval_pairs": len(eval_pairs),
                   "eval_source": cfg.eval_data or (f"{cfg.eval_split:g} of {cfg.data_label} (seed {cfg.seed})"
                                                    if cfg.eval_split else None)}
        return PreferenceData(pairs, eval_pairs, summary, findings)

    def build_trainer(self, cfg: RunConfig, data: PreferenceData, staging: Path) -> dict[str, Any]:
        """Model, LoRA plan and the unit's TRL trainer whose reference is the base with the adapter disabled
        (``{"trainer", "model", "plan", "profile", "processor", "quant", "findings"}``).

        What TRL trains of the rows given is counted (:func:`trained_rows`: rows cut and dropped at
        ``--max-seq-len``, G4T318/G4T319) into ``data.summary``, whose ``pairs`` (DPO) or ``answers`` (KTO) are
        then the rows trained; none left (G4T530) raises a ``FindingError`` here, before any step."""
        from transformers.trainer_callback import PrinterCallback

        from gemma4_tune.model.patches import patch_trl_compact_log_probs
        from gemma4_tune.model.profile import ModelProfile

        patch_trl_compact_log_probs()  # log-probabilities at the answer positions only, on the CPU too
        profile = ModelProfile.from_pretrained(cfg.model, count_parameters=False)
        peft_model, plan, processor, quant = adapted_model(cfg, profile)
        config_class, trainer_class = self.trl_trainer()
        args = config_class(**trainer_settings(cfg, staging), beta=cfg.beta, max_length=cfg.max_seq_len,
                            per_device_eval_batch_size=cfg.batch_size)
        given = self.rows(data.pairs)
        given_eval = self.rows(data.eval_pairs) if data.eval_pairs else None
        trainer = trainer_class(model=peft_model, ref_model=None, args=args, train_dataset=given,
                                eval_dataset=given_eval, processing_class=processor)
        trainer.remove_callback(PrinterCallback)
        figures, findings = trained_rows(given, trainer.train_dataset, trainer.data_collator, cfg.max_seq_len,
                                         what=self.unit_rows)
        data.summary.update({self.unit_rows: figures["trained"], "train_conversations": figures["trained"],
                             "truncated": figures["truncated"], "trl_rows": figures})
        if given_eval is not None:
            held, found = trained_rows(given_eval, trainer.eval_dataset, trainer.data_collator, cfg.max_seq_len,
                                       what=self.unit_rows, held_out=True)
            findings += found
            data.summary.update({f"eval_{self.unit_rows}": held["trained"], "eval_conversations": held["trained"],
                                 "eval_truncated": held["truncated"], "eval_trl_rows": held})
        if has_errors(findings):
            raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
        tokenizer = getattr(processor, "tokenizer", processor)
        trainer.data_collator = end_answers_at_end_of_turn(trainer.data_collator,
                                                           tokenizer.convert_tokens_to_ids(END_OF_TURN))
        drop_trl_reference_copy(peft_model)
        return {"trainer": trainer, "model": peft_model, "plan": plan, "profile": profile, "processor": processor,
                "quant": quant, "findings": findings}

    def preflight(self, cfg: RunConfig, built: dict[str, Any], data: PreferenceData) -> PreflightResult:
        """SFT's checks and the reference checks (:func:`preflight_pairs`) on a real batch of the trainer's own
        collator (:func:`probe_batch`)."""
        return preflight_pairs(built, probe_batch(built["trainer"]), data.summary, seed=cfg.seed)

    def evaluate(self, trainer: Any, out: Path) -> tuple[list[dict[str, Any]], list[Finding]]:
        """The tuned model's held-out rewards, after training; returns every held-out row of the run (the base's
        at step 0 and the Trainer's every ``eval_steps``, written by :class:`HeldOutRewards`) and G4T515 when
        neither the accuracy nor the margin rose from the base."""
        trainer.evaluate()
        evals = [row for row in read_metrics(out) if "eval_reward_margin" in row]
        return evals, not_learning(evals[0], evals[-1])

    def report_section(self, cfg: RunConfig, result: TrainResult) -> ReportSection:
        """Steps and loss, the held-out rewards before and after, the reference checks, and the log-probability and
        margin curves (``<method>.png``)."""
        steps = [m for m in result.metrics if "loss" in m]
        summary: dict[str, Any] = {"method": self.name, "steps": steps[-1]["step"] if steps else 0,
                                   "first loss": round(steps[0]["loss"], 4) if steps else None,
                                   "last loss": round(steps[-1]["loss"], 4) if steps else None,
                                   "seconds": result.seconds, "adapter": str(result.adapter or "-"),
                                   "resumed from": result.resumed_from or "-", **base_weights_line(result.quant)}
        rows = result.dpo.get("rows")
        if rows:
            summary[f"{self.unit_rows} trained"] = rows_line(rows)
        evals = result.dpo["evals"]
        if len(evals) >= 2:
            summary.update(self.held_out_summary(evals[0], evals[-1]))
        pf = result.dpo["preflight"]
        if pf:
            summary["step-0 log-ratio (policy vs reference)"] = f"{pf['max_abs_log_ratio_step0']:.1e}"
            summary["reference = base with adapter disabled"] = ("yes" if pf["reference_equals_base"] else "NO")
        return ReportSection(summary, section=result.dpo, plot=dpo_plot(result.metrics,
                                                                         result.out / f"{self.name}.png"))

    def train(self, cfg: RunConfig) -> TrainResult:
        """One run: pairs, model and LoRA, preflight, training with checkpoints, held-out rewards, the adapter."""
        from gemma4_tune.export.manifest import write_manifest
        from gemma4_tune.plan.adapters import save_adapter
        from gemma4_tune.train.callbacks import (
            AtomicCheckpointCallback,
            GuardCallback,
            MetricsCallback,
            ProgressCallback,
            TokenCounter,
        )

        started = time.perf_counter()
        run = open_run(cfg)
        out = run.out
        run.start()

        data = self.read_data(cfg)
        findings = [*run.notes, *data.findings]
        counter = TokenCounter()
        staging = out / STAGING
        built = self.build_trainer(cfg, data, staging)
        trainer, peft_model, plan = built["trainer"], built["model"], built["plan"]
        findings += plan.findings + built["findings"]
        guard = GuardCallback(peft_model)
        for callback in (guard, ProgressCallback(counter), MetricsCallback(out / "metrics.jsonl", counter),
                         AtomicCheckpointCallback(staging, run.checkpoints, cfg.save_total_limit)):
            trainer.add_callback(callback)
        preflight = self.preflight(cfg, built, data) if cfg.preflight else None  # its batch is not counted
        count_tokens(trainer, counter)
        if preflight is not None:
            findings += preflight.findings
            write_json(out / "preflight.json", preflight.to_dict())
            figures = preflight.reference
            console.print(f"preflight ({self.name}): loss {preflight.loss:.4f}, " + (
                f"step-0 log-ratio {figures['max_abs_log_ratio_step0']:.1e}, reference = base "
                f"{figures['reference_equals_base']}, " if figures else "") + f"{len(preflight.findings)} findings")
        else:
            findings.append(finding(PREFLIGHT_SKIPPED.code, "preflight was skipped (--no-preflight): nothing checked "
                                    "that the reference is the base or that every planned tower gets a gradient",
                                    "drop --no-preflight (it costs one forward and backward)"))
        if has_errors(findings):
            raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
        if data.eval_pairs:
            trainer.add_callback(HeldOutRewards(out / "metrics.jsonl", cfg.eval_steps, self.rewards_row))
            if run.resume_from is None:
                trainer.evaluate()  # the base's held-out rewards: the adapter is fresh (B = 0)
        trainer.train(resume_from_checkpoint=run.resume_from)
        shutil.rmtree(staging, ignore_errors=True)
        findings += guard.findings
        evals: list[dict[str, Any]] = []
        if data.eval_pairs:
            evals, judged = self.evaluate(trainer, out)
            findings += judged
        adapter = None
        samples = []
        if not guard.findings:
            adapter = save_adapter(peft_model, out / "adapter", plan=plan, overwrite=True)
            write_manifest(adapter, cfg.model, training=cfg.dump(), versions=library_versions(),
                           template_revision=None, quantization=built["quant"])
            if cfg.samples:
                samples = _samples(cfg, peft_model, built["processor"], data.eval_pairs or data.pairs,
                                   held_out=bool(data.eval_pairs))
        write_json(out / "run.json", {"config": cfg.dump(), "method": self.name, "data": data.summary,
                                      "resumed_from": run.resume_from,
                                      "plan": {"spec": plan.spec, "trainable": plan.trainable_by_group()},
                                      "versions": library_versions()})
        return TrainResult(out=out, adapter=adapter, plan=plan, data=data.summary, metrics=read_metrics(out),
                           seconds=round(time.perf_counter() - started, 2), findings=findings,
                           resumed_from=run.resume_from, model=peft_model, probe_batch={}, samples=samples,
                           distributed=None, trained_state={}, preflight=preflight,
                           dpo={"preflight": preflight.reference if preflight else {}, "evals": evals,  # KTO's too
                                "rows": data.summary.get("trl_rows"), "eval_rows": data.summary.get("eval_trl_rows"),
                                "unit_rows": self.unit_rows},
                           quant=built["quant"])

    def preflight_only(self, cfg: RunConfig) -> PreflightResult:
        """``preflight --method dpo`` (or ``kto``): pairs, model, LoRA and TRL's trainer as training builds them, the
        checks on a real batch; nothing is written."""
        import tempfile

        data = self.read_data(cfg)
        with tempfile.TemporaryDirectory(prefix=f"gemma4-tune-{self.name}-preflight-") as staging:
            built = self.build_trainer(cfg, data, Path(staging))
            result = self.preflight(cfg, built, data)
        result.findings[:0] = [*data.findings, *built["plan"].findings, *built["findings"]]
        return result


__all__ = ["PAIRS_CUT_AWAY", "HeldOutRewards", "PreferenceData", "PreferenceMethod", "as_supervised", "count_tokens",
           "dpo_plot", "dpo_preflight", "end_answers_at_end_of_turn", "margin_line", "not_learning", "preflight_pairs",
           "probe_batch", "rows_line", "sequence_logps", "trained_rows", "trl_dataset"]
