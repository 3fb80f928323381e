"""The training loss, shared by training, preflight and held-out evaluation so all three agree."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and supervised-token count of one batch.

    Position ``t`` predicts ``labels[t + 1]``; positions labelled ``-100`` (prompts, media,
    padding) count nowhere.
    """
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, target.ne(IGNORE_INDEX).sum()


def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many supervised positions the greedy prediction gets right (same shift and mask as the loss)."""
    target = labels[:, 1:].to(logits.device)
    return (logits[:, :-1, :].argmax(-1).eq(target) & target.ne(IGNORE_INDEX)).sum()


def token_mean_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy summed over supervised tokens, divided by the supervised tokens of the whole step.

    The Trainer passes ``num_items_in_batch`` (all micro-batches of one optimizer step) to a
    ``compute_loss_func``, so every token weighs the same under gradient accumulation, which
    Gemma 4's own loss does not do (``accepts_loss_kwargs = False``, row 26).
    """
    total, count = token_sums(outputs.logits, labels)
    return total / (num_items_in_batch if num_items_in_batch is not None else count)
