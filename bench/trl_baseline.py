"""The baseline trainer: plain TRL ``SFTTrainer`` + PEFT ``LoraConfig``, as their docs show it.

The model is passed by path (TRL loads it with the architecture in its config, here
``Gemma4ForConditionalGeneration``, and its ``AutoProcessor``); the chat rows become TRL's
conversational prompt/completion form so that the loss is on the answer only, as in gemma4-tune.
LoRA goes on the language model's attention and MLP projections (the towers are not trained).

Run as ``python bench/trl_baseline.py MODEL DATA OUT --batch-size 4 ...``; prints one JSON line:
real (non-pad) tokens TRL counted, seconds from the start of training to its last logged step,
tokens/s and the mean training loss.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from transformers import TrainerCallback

TEXT_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LoopTimer(TrainerCallback):
    """Seconds from ``on_train_begin`` to the last logged step, and TRL's own token count."""

    def __init__(self) -> None:
        self.started = 0.0
        self.last = 0.0
        self.tokens = 0
        self.losses: list[float] = []
        self.elapsed: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.last = time.perf_counter()
            self.elapsed.append(self.last - self.started)
            self.tokens = int(logs["num_tokens"])
            self.losses.append(float(logs["loss"]))


def train(model: str, data: str, out: str, *, batch_size: int, max_len: int, rank: int, lr: float,
          epochs: float, seed: int, bf16: bool) -> dict[str, Any]:
    """Train with SFTTrainer + LoRA; return the loop's tokens, seconds, tokens/s and losses."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=data, split="train")
    dataset = dataset.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                          remove_columns=["messages"])
    return sft_train(model, dataset, out, batch_size=batch_size, max_len=max_len, rank=rank, lr=lr, epochs=epochs,
                     seed=seed, bf16=bf16)


def sft_train(model: str, dataset: Any, out: str, *, batch_size: int, max_len: int, rank: int, lr: float,
              epochs: float, seed: int, bf16: bool, **sft: Any) -> dict[str, Any]:
    """SFTTrainer + PEFT LoraConfig on ``dataset`` as their docs show it (``sft``: more SFTConfig fields); the loop's
    tokens, seconds, tokens/s, losses, dtype and trainable parameters."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch_size, max_length=max_len, learning_rate=lr,
                     num_train_epochs=epochs, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                     seed=seed, bf16=bf16, use_cpu=not bf16, report_to="none", disable_tqdm=True,
                     # like with like: TRL loads a model path in fp32 unless told, gemma4-tune in bf16 on CUDA
                     model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"}, **sft)
    peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TEXT_PROJECTIONS,
                             task_type="CAUSAL_LM")
    timer = LoopTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=[timer])
    trainer.train()
    seconds = timer.last - timer.started
    return {"tokens": timer.tokens, "seconds": round(seconds, 3), "tokens_per_s": round(timer.tokens / seconds, 2),
            "steps": len(timer.losses),
            "step_seconds": [round(b - a, 3) for a, b in zip([0.0, *timer.elapsed], timer.elapsed)],
            "first_loss": timer.losses[0], "mean_loss": sum(timer.losses) / len(timer.losses),
            "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-len", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    a = parser.parse_args()
    print(json.dumps(train(a.model, a.data, a.out, batch_size=a.batch_size, max_len=a.max_len, rank=a.rank, lr=a.lr,
                           epochs=a.epochs, seed=a.seed, bf16=a.bf16)))


if __name__ == "__main__":
    main()
