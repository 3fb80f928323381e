"""The transformers Trainer with the loss of ``model/loss.py``: no vocabulary projection beyond the supervised positions."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from gemma4_tune.model.loss import SupervisedLoss, no_logits


class SupervisedLogitsTrainer(Trainer):
    """A Trainer whose forward asks the model for no logits (``logits_to_keep``, all False); its
    ``compute_loss_func`` (a :class:`SupervisedLoss`) projects the supervised positions only, in chunks.

    Everything else (gradient accumulation, ``num_items_in_batch``, the scaling across processes) is the
    Trainer's own ``compute_loss``, which this calls.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The Trainer's loss, with the final hidden states captured for the chunked projection."""
        loss_fn = self.compute_loss_func
        if not isinstance(loss_fn, SupervisedLoss):
            raise TypeError("SupervisedLogitsTrainer needs compute_loss_func=SupervisedLoss()")
        with loss_fn.capture(model):
            return super().compute_loss(model, {**inputs, "logits_to_keep": no_logits(inputs["labels"])},
                                        return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
