"""Kahneman-Tversky Optimization (``train --method kto``) on TRL's KTOTrainer: the pairs unpaired into answers
labelled desirable or not (:func:`kto_dataset`); the reference is the base with the adapter disabled
(``train.preference``)."""

from __future__ import annotations

from typing import Any

from gemma4_tune.train.preference import PreferenceMethod, margin_line, trl_dataset


def kto_dataset(pairs: list[Any]) -> Any:
    """The pairs unpaired for KTO: each chosen answer a row labelled True, each rejected one a row labelled False
    (as ``trl.data_utils.unpair_preference_dataset``, which KTOTrainer refuses to run itself on image rows).

    The order is ours: TRL's puts all chosen rows before all rejected ones, and KTOTrainer samples in order (its
    KL estimate pairs each row with its neighbour's answer), so every batch would hold one label only. Here the
    labels alternate, pair ``i``'s chosen row next to pair ``i + 1``'s rejected row: each batch of two holds one
    of each, and the neighbours whose answers make the mismatched KL rows have different prompts.
    """
    from datasets import Dataset

    paired = trl_dataset(pairs)
    n = len(paired)
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
    if "images" in paired.column_names:
        rows["images"] = []
    for i in range(n):
        for j, side, label in ((i, "chosen", True), ((i + 1) % n, "rejected", False)):
            rows["prompt"].append(paired[j]["prompt"])
            rows["completion"].append(paired[j][side])
            rows["label"].append(label)
            if "images" in rows:
                rows["images"].append(paired[j]["images"])
    return Dataset.from_dict(rows)


class KTO(PreferenceMethod):
    """KTO: answers labelled desirable or not; held-out mean rewards of each kind, their margin and the KL estimate."""

    name = "kto"
    description = "Kahneman-Tversky Optimization on answers labelled desirable or not (TRL's KTOTrainer)"

    def rows(self, pairs: list[Any]) -> Any:
        """The pairs unpaired, labels alternating (:func:`kto_dataset`)."""
        return kto_dataset(pairs)

    def trl_trainer(self) -> tuple[type, type]:
        """TRL's KTOConfig and KTOTrainer."""
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer

    def rewards_row(self, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """KTO's evaluation has no pairs to count an accuracy on: its figures at ``step`` are the mean rewards of the
        chosen and of the rejected answers (the margin is their difference), its KL estimate, its loss and
        log-probabilities."""
        chosen, rejected = metrics["eval_rewards/chosen"], metrics["eval_rewards/rejected"]
        return {"step": step, "eval_reward_margin": chosen - rejected, "eval_reward_chosen": chosen,
                "eval_reward_rejected": rejected, "eval_kl": metrics["eval_kl"], "eval_kto_loss": metrics["eval_loss"],
                "eval_logps_chosen": metrics["eval_logps/chosen"],
                "eval_logps_rejected": metrics["eval_logps/rejected"]}

    def held_out_summary(self, first: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
        """The held-out reward margin, base -> tuned (KTO counts no accuracy)."""
        return margin_line(first, last)


METHOD = KTO()
