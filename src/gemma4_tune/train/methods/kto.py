"""Kahneman-Tversky Optimization (``train --method kto``) on TRL's KTOTrainer: answers labelled desirable or not,
read unpaired (TRL's ``prompt``/``completion``/``label``, LLaMA-Factory's ``messages`` + ``kto_tag``) or unpaired
from pairs (:func:`kto_dataset`); the reference is the base with the adapter disabled (``train.preference``).

KTO needs at least two rows per device batch: its KL term is estimated on each row's prompt with a neighbour's
answer, and TRL 1.16's KTOTrainer raises a ValueError at ``per_device_train_batch_size`` 1 (its ``calculate_KL``,
on for the ``kto`` loss). ``--batch-size 1`` is refused before the data is read (G4T005), with the settings that
keep the effective batch."""

from __future__ import annotations

from typing import Any

from gemma4_tune.config.options import BAD_CONFIG, RunConfig
from gemma4_tune.data.preference import LabelledAnswer
from gemma4_tune.findings import Finding, FindingError, finding
from gemma4_tune.train.base import trl_messages
from gemma4_tune.train.preference import PreferenceData, PreferenceMethod, margin_line, trl_dataset


def kto_dataset(pairs: list[Any]) -> Any:
    """KTO's rows: each pair's chosen answer a row labelled True, its rejected one a row labelled False (as
    ``trl.data_utils.unpair_preference_dataset``, which KTOTrainer refuses to run itself on image rows), then the
    unpaired answers (``LabelledAnswer``) in their order, with their own labels. ``source`` names each row's
    ``file:line`` (and side).

    The order of the pairs' rows is ours: TRL's puts all chosen rows before all rejected ones, and KTOTrainer samples
    in order (its KL estimate pairs each row with its neighbour's answer), so every batch would hold one label only.
    Here the labels alternate, pair ``i``'s chosen row next to pair ``i + 1``'s rejected row: each batch of two holds
    one of each, and the neighbours whose answers make the mismatched KL rows have different prompts.
    """
    from datasets import Dataset

    answers = [item for item in pairs if isinstance(item, LabelledAnswer)]
    pairs = [item for item in pairs if not isinstance(item, LabelledAnswer)]
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": [], "source": []}
    with_images = any(item.images for item in (*pairs, *answers))
    if with_images:
        rows["images"] = []
    if pairs:
        paired = trl_dataset(pairs)
        n = len(paired)
        for i in range(n):
            for j, side, label in ((i, "chosen", True), ((i + 1) % n, "rejected", False)):
                row = paired[j]
                rows["prompt"].append(row["prompt"])
                rows["completion"].append(row[side])
                rows["label"].append(label)
                rows["source"].append(f"{row['source']} ({side})")
                if with_images:
                    rows["images"].append(row.get("images") or [])
    if answers:
        from PIL import Image

        for answer in answers:
            rows["prompt"].append(trl_messages(answer.prompt))
            rows["completion"].append(trl_messages(answer.completion))
            rows["label"].append(answer.label)
            rows["source"].append(answer.source or f"#{answer.source_row}")
            if with_images:
                rows["images"].append([Image.open(path).convert("RGB") for path in answer.images])
    return Dataset.from_dict(rows)


def batch_size_finding(batch_size: int, grad_accum: int) -> Finding | None:
    """G4T005 for ``--batch-size 1`` (KTO's KL term needs a second row), with the settings that keep the
    effective batch (``batch_size x grad_accum``) where it can be kept; None from 2 on."""
    if batch_size >= 2:
        return None
    effective = batch_size * grad_accum
    keep = (f"--batch-size 2 --grad-accum {effective // 2} (the same effective batch of {effective})"
            if effective % 2 == 0 else f"--batch-size 2 (the effective batch grows from {effective} to "
            f"{2 * grad_accum}; lower --grad-accum to keep it near)")
    return finding(BAD_CONFIG.code, f"flags: batch_size: KTO needs at least 2 rows per device batch (given: "
                   f"{batch_size}): its KL term is estimated on each row's prompt with another row's answer, and with "
                   "one row that answer is its own, so the KL term would equal the reward (TRL's KTOTrainer refuses "
                   "to start)", f"set {keep}")


class KTO(PreferenceMethod):
    """KTO: answers labelled desirable or not; held-out mean rewards of each kind, their margin and the KL estimate."""

    name = "kto"
    description = "Kahneman-Tversky Optimization on answers labelled desirable or not (TRL's KTOTrainer)"
    unpaired = True
    unit_rows = "answers"

    def read_data(self, cfg: RunConfig) -> PreferenceData:
        """The settings KTO cannot run (``--batch-size 1``: G4T005), then the pairs and unpaired answers as DPO
        reads pairs, before any model loads."""
        found = batch_size_finding(cfg.batch_size, cfg.grad_accum)
        if found is not None:
            raise FindingError(found)
        return super().read_data(cfg)

    def rows(self, pairs: list[Any]) -> Any:
        """The pairs unpaired, labels alternating, then the unpaired answers (:func:`kto_dataset`)."""
        return kto_dataset(pairs)

    def trl_trainer(self) -> tuple[type, type]:
        """TRL's KTOConfig and KTOTrainer."""
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer

    def rewards_row(self, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """KTO's evaluation has no pairs to count an accuracy on: its figures at ``step`` are the mean rewards of the
        chosen and of the rejected answers (the margin is their difference), its KL estimate, its loss and
        log-probabilities; a figure of a label the held-out answers lack is NaN (TRL logs none)."""
        figure = {key: metrics.get(f"eval_{key}", float("nan"))  # held-out answers of one label: NaN (null) for
                  for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")}  # the other
        chosen, rejected = figure["rewards/chosen"], figure["rewards/rejected"]
        return {"step": step, "eval_reward_margin": chosen - rejected, "eval_reward_chosen": chosen,
                "eval_reward_rejected": rejected, "eval_kl": metrics["eval_kl"], "eval_kto_loss": metrics["eval_loss"],
                "eval_logps_chosen": figure["logps/chosen"], "eval_logps_rejected": figure["logps/rejected"]}

    def held_out_summary(self, first: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
        """The held-out reward margin, base -> tuned (KTO counts no accuracy)."""
        return margin_line(first, last)


METHOD = KTO()
