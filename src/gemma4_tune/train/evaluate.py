"""Did the fine-tune help? Held-out loss and accuracy, and base-vs-tuned generations side by side.

The eval loss is the training loss (``model.loss.batch_sums``: same shift, same masking, per
supervised token, logits only at the supervised positions) summed over the whole held-out set;
accuracy is the share of supervised (assistant) tokens whose greedy prediction is right.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gemma4_tune.data.chat import END_OF_TURN
from gemma4_tune.model.loss import batch_sums


@dataclass
class EvalResult:
    """Held-out figures at one step."""

    step: int
    loss: float
    accuracy: float
    tokens: int       # supervised tokens evaluated
    seconds: float

    def to_row(self, trained_tokens: int) -> dict[str, Any]:
        """The ``metrics.jsonl`` row (``tokens``: training tokens seen so far, as on loss rows)."""
        return {"step": self.step, "eval_loss": round(self.loss, 6), "eval_accuracy": round(self.accuracy, 6),
                "eval_tokens": self.tokens, "eval_seconds": round(self.seconds, 3), "tokens": trained_tokens}


def _device(model: Any) -> torch.device:
    return next(p.device for p in model.parameters())


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate(model: Any, batcher: Any, examples: list[dict[str, Any]], *, batch_size: int = 1,
             step: int = 0) -> EvalResult:
    """Loss and accuracy over every supervised token of ``examples`` (encoded by ``batcher``)."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = correct = 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = _to(batcher.collate(examples[i:i + batch_size]), device)
                labels = batch.pop("labels")
                loss_sum, n, hits = batch_sums(model, batch, labels, hits=True)
                total += loss_sum.double().cpu()
                count += int(n)
                correct += int(hits)
    finally:
        model.train(was_training)
    return EvalResult(step=step, loss=float(total / max(count, 1)), accuracy=correct / max(count, 1), tokens=count,
                      seconds=time.perf_counter() - started)


@dataclass
class Sample:
    """One held-out prompt with the reference answer and both models' greedy answers."""

    kind: str          # text, image or audio
    source: str        # file:line of the conversation
    prompt: str        # the last user text of the prompt
    reference: str
    base: str
    tuned: str
    held_out: bool
    tuned_stopped: bool = False  # the tuned model ended its answer with <turn|> (or EOS) within the token budget
    base_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def pick_samples(conversations: list[Any], n: int) -> list[Any]:
    """Up to ``n`` conversations, in file order: the first with an image, the first with audio, then text-only ones.

    Media-only data fills the rest with further media conversations. Plain-text rows and conversations that
    open with the assistant have no prompt to answer and are never picked.
    """
    if n <= 0:
        return []
    conversations = [c for c in conversations if getattr(c, "text", None) is None
                     and any(m["role"] == "assistant" for m in c.messages[1:])]
    firsts = [next((c for c in conversations if getattr(c, kind)), None) for kind in ("images", "audios")]
    picked = [c for c in firsts if c is not None][:n]
    text_only = [c for c in conversations if not c.images and not c.audios]
    for conv in text_only + conversations:
        if len(picked) >= n:
            break
        if not any(conv is p for p in picked):
            picked.append(conv)
    return [c for c in conversations if any(c is p for p in picked)]


def _last_user_text(conv: Any) -> str:
    for message in reversed(conv.messages[:max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")]):
        if message["role"] == "user":
            texts = [p.get("text", "") for p in message["content"] if p["type"] == "text"]
            media = [f"[{p['type']}]" for p in message["content"] if p["type"] in ("image", "audio")]
            return " ".join([*media, *texts]).strip()
    return ""


def generate_samples(model: Any, batcher: Any, conversations: list[Any], *, held_out: bool,
                     max_new_tokens: int = 32) -> list[Sample]:
    """Greedy answers of the tuned model and of the base model (adapter disabled) to each prompt."""
    tokenizer = batcher.tokenizer
    device = _device(model)
    was_training = model.training
    model.eval()

    stops = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id}

    def answer(inputs: dict[str, torch.Tensor]) -> tuple[str, bool]:
        """The greedy answer, and whether it ended on its own (catalog row 29: the model learned to stop)."""
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=batcher.pad_token_id)
        new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return text, any(t in stops for t in new_ids)

    samples = []
    try:
        with torch.no_grad():
            for conv in conversations:
                inputs, reference = batcher.encode_prompt(conv)
                inputs = _to(inputs, device)
                tuned, tuned_stopped = answer(inputs)
                with model.disable_adapter():
                    base, base_stopped = answer(inputs)
                kind = "image" if conv.images else "audio" if conv.audios else "text"
                samples.append(Sample(kind, conv.source, _last_user_text(conv), reference, base, tuned, held_out,
                                      tuned_stopped, base_stopped))
    finally:
        model.train(was_training)
    return samples
