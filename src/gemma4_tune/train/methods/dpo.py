"""Direct Preference Optimization (``train --method dpo``) on TRL's DPOTrainer: each pair's chosen and rejected
answers in one row; the reference is the base with the adapter disabled (``train.preference``)."""

from __future__ import annotations

from typing import Any

from gemma4_tune.io import figure_text
from gemma4_tune.train.preference import PreferenceMethod, margin_line, trl_dataset


class DPO(PreferenceMethod):
    """DPO: the pairs as TRL's explicit-prompt conversational rows; held-out reward accuracy and margin."""

    name = "dpo"
    description = "Direct Preference Optimization on chosen/rejected pairs (TRL's DPOTrainer)"

    def rows(self, pairs: list[Any]) -> Any:
        """TRL's ``prompt``/``chosen``/``rejected`` rows (``images`` where the pairs have them)."""
        return trl_dataset(pairs)

    def trl_trainer(self) -> tuple[type, type]:
        """TRL's DPOConfig and DPOTrainer."""
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer

    def rewards_row(self, metrics: dict[str, float], step: int) -> dict[str, Any]:
        """Held-out reward accuracy (a tie counts as wrong, as TRL counts it), margin, loss and log-probabilities
        at ``step``."""
        return {"step": step, "eval_reward_accuracy": metrics["eval_rewards/accuracies"],
                "eval_reward_margin": metrics["eval_rewards/margins"], "eval_dpo_loss": metrics["eval_loss"],
                "eval_logps_chosen": metrics["eval_logps/chosen"],
                "eval_logps_rejected": metrics["eval_logps/rejected"]}

    def held_out_summary(self, first: dict[str, Any], last: dict[str, Any]) -> dict[str, str]:
        """Held-out reward accuracy and margin, base -> tuned."""
        return {"held-out reward accuracy (base -> tuned)": f"{figure_text(first['eval_reward_accuracy'], '.1%')} -> "
                                                            f"{figure_text(last['eval_reward_accuracy'], '.1%')}",
                **margin_line(first, last)}


METHOD = DPO()
