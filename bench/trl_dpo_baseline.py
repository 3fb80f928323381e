"""TRL 1.16's DPOTrainer used plainly: TRL loads the model itself and wraps it with a ``peft_config``.

The LoRA config puts the adapter on the same modules as gemma4-tune's plan (``--targets text``, exact paths
read from a file), so both sides train the same parameters. Prints one JSON line: real tokens (TRL's
``num_tokens``: the attention mask of each [chosen; rejected] batch), loop seconds (``on_train_begin`` to the
last logged step), tokens/s and the first step's loss. Never imports gemma4_tune.

usage: trl_dpo_baseline.py MODEL DATA.jsonl OUT TARGETS.json --batch-size N --max-len N --rank N --lr X --beta B
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from datasets import load_dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoProcessor, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402


class LoopTimer(TrainerCallback):
    """Loop seconds and TRL's token count at each logged step."""

    def __init__(self) -> None:
        self.started = 0.0
        self.rows: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001
        self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, "loss": logs["loss"], "tokens": logs.get("num_tokens"),
                              "seconds": time.perf_counter() - self.started})


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("model", "data", "out", "targets"):
        ap.add_argument(name)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-len", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--beta", type=float, required=True)
    a = ap.parse_args()
    targets = json.loads(open(a.targets).read())
    timer = LoopTimer()
    args = DPOConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, learning_rate=a.lr, num_train_epochs=1,
                     beta=a.beta, max_length=a.max_len, bf16=False, use_cpu=True, logging_steps=1, save_strategy="no",
                     report_to=[], disable_tqdm=True, seed=0, activation_checkpointing=True)
    trainer = DPOTrainer(model=a.model, args=args, train_dataset=load_dataset("json", data_files=a.data, split="train"),
                         processing_class=AutoProcessor.from_pretrained(a.model), callbacks=[timer],
                         peft_config=LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=targets))
    trainer.train()
    last = timer.rows[-1]
    print(json.dumps({"tokens": last["tokens"], "seconds": round(last["seconds"], 3),
                      "tokens_per_s": round(last["tokens"] / last["seconds"], 2), "steps": len(timer.rows),
                      "first_loss": timer.rows[0]["loss"],
                      "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}))


if __name__ == "__main__":
    main()
