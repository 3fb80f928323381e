"""The training loss, shared by training, preflight and held-out evaluation so all three agree.

Position ``t`` predicts ``labels[t + 1]``; positions labelled ``-100`` (system prompt, user turns,
media, padding, packed boundaries) count nowhere. Gemma 4's vocabulary has 262,144 entries, so
the logits of a whole batch are the largest tensors of a training step (4 GiB in fp32 for 4,096
positions), and with assistant-only loss most positions carry no label. So the model is asked for
no logits at all (``logits_to_keep``, a public argument of every Gemma 4 head, given an all-False
mask); the final norm's output is taken by a forward hook, the supervised positions are selected,
and the vocabulary projection (``lm_head``, then the final logit softcap, as the model applies
them) and the cross-entropy run over chunks of them, each chunk recomputed in the backward pass
(``torch.utils.checkpoint``): peak memory is bounded by one chunk, not by the sequence. The loss
and its gradients are those of the full computation (tests/test_loss.py, rel 1e-6 in fp32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
#: fp32 logits one chunk may hold: 256 positions at Gemma 4's 262,144-entry vocabulary.
CHUNK_BYTES = 256 * 2**20


def unwrapped(model: Any) -> Any:
    """The transformers model under the DDP / DeepSpeed (``.module``) and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_norm(model: Any) -> torch.nn.Module:
    """The language model's last norm, whose output the vocabulary projection reads."""
    base = unwrapped(model)
    decoder = base.model.language_model if hasattr(base.model, "language_model") else base.model
    return decoder.norm


def no_logits(labels: torch.Tensor) -> torch.Tensor:
    """A ``logits_to_keep`` mask that keeps no position: the model computes no vocabulary projection."""
    return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)


@contextlib.contextmanager
def captured_hidden(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """``{"hidden": final-norm output}`` of the forward passes run inside the block."""
    box: dict[str, torch.Tensor] = {}
    handle = final_norm(model).register_forward_hook(lambda _m, _i, out: box.__setitem__("hidden", out))
    try:
        yield box
    finally:
        handle.remove()


def _logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The model's own logits at ``hidden`` (``lm_head`` then the softcap, in the model's dtype), in fp32 or wider
    (a float64 model keeps float64)."""
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor, softcap: float | None
                ) -> torch.Tensor:
    return F.cross_entropy(_logits(head, hidden, softcap), target, reduction="sum")


def supervised(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label, and those labels (``[N, hidden]``, ``[N]``)."""
    target = labels[:, 1:].to(hidden.device)
    keep = target.ne(IGNORE_INDEX)
    return hidden[:, :-1][keep], target[keep]


def head_sums(model: Any, hidden: torch.Tensor, labels: torch.Tensor, *, hits: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy, supervised-token count and (``hits``) greedy hits, from final hidden states.

    Chunks of :data:`CHUNK_BYTES` of fp32 logits; with gradients enabled each chunk is recomputed
    in the backward pass instead of being kept (reentrant checkpointing: under ZeRO-3 the
    non-reentrant kind would recompute with ``lm_head``'s weight already released to its shard).
    """
    base = unwrapped(model)
    head = base.get_output_embeddings()
    text = base.config.get_text_config()
    softcap = text.final_logit_softcapping
    rows, target = supervised(hidden, labels)
    chunk = max(1, CHUNK_BYTES // (4 * text.vocab_size))  # not lm_head's weight: ZeRO-3 leaves it an empty shard
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for i in range(0, rows.shape[0], chunk):
        h, t = rows[i:i + chunk], target[i:i + chunk]
        if hits or not torch.is_grad_enabled():
            logits = _logits(head, h, softcap)
            total = total + F.cross_entropy(logits, t, reduction="sum")
            if hits:
                correct += logits.argmax(-1).eq(t).sum()
        else:
            total = total + checkpoint(_chunk_loss, head, h, t, softcap, use_reentrant=True)
    return total, target.new_tensor(target.numel()), (correct if hits else None)


def batch_sums(model: Any, inputs: dict[str, Any], labels: torch.Tensor, *, hits: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``model`` on ``inputs`` without its vocabulary projection; :func:`head_sums` of the batch."""
    with captured_hidden(model) as box:
        model(**inputs, logits_to_keep=no_logits(labels), use_cache=False)
    return head_sums(model, box["hidden"], labels, hits=hits)


class SupervisedLoss:
    """The Trainer's ``compute_loss_func``: cross-entropy at supervised positions only (see the module doc).

    ``capture(model)`` wraps the Trainer's forward, which must have been asked for no logits
    (``logits_to_keep=no_logits(labels)``): :class:`gemma4_tune.train.trainer.SupervisedLogitsTrainer` does both.
    The sum is divided by ``num_items_in_batch`` (the supervised tokens of all micro-batches of one
    optimizer step) so every token weighs the same under gradient accumulation, which Gemma 4's own
    loss does not do (``accepts_loss_kwargs = False``, row 26).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.box: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def capture(self, model: Any) -> Iterator[None]:
        """Take the final hidden states of the forward run inside the block."""
        with captured_hidden(model) as box:
            self.model, self.box = model, box
            try:
                yield
            finally:
                self.model, self.box = None, {}

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        total, count, _ = head_sums(self.model, self.box["hidden"], labels)
        return total / (num_items_in_batch if num_items_in_batch is not None else count)
