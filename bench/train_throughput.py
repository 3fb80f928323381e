"""Training throughput: `gemma4-tune train` against plain TRL SFTTrainer + PEFT, and with --packing.

One CPU-sized Gemma 4 (E2B structure, ~35 M parameters), one text-only chat JSONL with log-normal
answer lengths, the same settings on every side (batch size, sequence length, rank, alpha, lr, one
epoch, so the same steps for the unpacked runs, gradient checkpointing on as both tools default).
Each run is a fresh process; the runs are interleaved A B C C B A A B C so that a change in the
machine's load hits every side alike. Tokens/s counts real (non-pad) tokens only, over the training loop
(from the Trainer's ``on_train_begin`` to its last logged step; loading, preflight and the report
are outside it). Packing's loss equality is checked directly: the same examples, padded and packed,
through the same LoRA model, give the same summed token loss. Whether the two trainers see the same
batches is measured, not assumed: with lora_B at zero (PEFT's initialisation) the first step's loss is the
base model's loss on the first batch, so equal batches give equal first-step losses; both are recorded with
both trainable-parameter counts (``same_work``).

Writes bench/results/train_throughput.json and bench/results/packing.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import yaml

ROWS = 32
BATCH_SIZE = 4
MAX_SEQ_LEN = 256
RANK = 16
LR = 2e-4
ROUNDS = ("ours", "trl", "packed", "packed", "trl", "ours", "ours", "trl", "packed")


def run_ours(model: Path, data: Path, out: Path, *, packing: bool) -> dict[str, Any]:
    """`gemma4-tune train` in a fresh process; loop seconds from its metrics.jsonl, real tokens from run.json."""
    from gemma4_tune.config.options import RunConfig

    settings = {"model": str(model), "data": str(data), "out": str(out), "batch_size": BATCH_SIZE,
                "max_seq_len": MAX_SEQ_LEN, "rank": RANK, "lr": LR, "epochs": 1, "save_steps": 100_000,
                "packing": packing, "preflight": False}
    if "samples" in RunConfig.model_fields:  # generated answers are a report feature, not training
        settings["samples"] = 0
    run_file = out.with_suffix(".yaml")
    run_file.write_text(yaml.safe_dump(settings))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gemma4_tune", "train", str(run_file)], capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"gemma4-tune train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in rows]
    record = json.loads((out / "run.json").read_text())
    data = record["data"]
    tokens = data["tokens"]  # real tokens of every example; one epoch trains each once
    return {"tokens": tokens, "seconds": round(elapsed[-1], 3), "tokens_per_s": round(tokens / elapsed[-1], 2),
            "steps": len(rows), "first_loss": rows[0]["loss"], "mean_loss": sum(r["loss"] for r in rows) / len(rows),
            "step_seconds": [round(b - a, 3) for a, b in zip([0.0, *elapsed], elapsed)],
            "collator_tokens": rows[-1]["tokens"], "wall_seconds": round(wall, 1),
            "encoded_rows": data["encoded_examples"],
            "trainable_parameters": record["plan"]["trainable"]["total"]}


def run_trl(model: Path, data: Path, out: Path, *, bf16: bool = False) -> dict[str, Any]:
    """bench/trl_baseline.py in a fresh process (``bf16`` on CUDA, as gemma4-tune does there)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(common.BENCH / "trl_baseline.py"), str(model), str(data), str(out),
                           "--batch-size", str(BATCH_SIZE), "--max-len", str(MAX_SEQ_LEN), "--rank", str(RANK),
                           "--lr", str(LR), *(["--bf16"] if bf16 else [])], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"TRL baseline failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - started, 1)}


def packed_loss_equality(model: Path, data: Path, n: int = 8) -> dict[str, Any]:
    """Summed token loss of the same ``n`` examples, padded vs packed, through the same LoRA model."""
    import torch
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.data.records import load_conversations
    from gemma4_tune.model.loss import batch_sums
    from gemma4_tune.plan.adapters import LoraSettings, prepare_model

    conversations, _ = load_conversations(str(data))
    batcher = Gemma4Batcher(AutoProcessor.from_pretrained(str(model)), max_seq_len=MAX_SEQ_LEN)
    examples = [batcher.encode(c) for c in conversations[:n]]
    torch.manual_seed(0)
    peft_model, _ = prepare_model(Gemma4ForConditionalGeneration.from_pretrained(str(model)), "text",
                                  LoraSettings(rank=RANK))
    with torch.no_grad():  # non-zero LoRA B, so the adapter takes part in the comparison
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.eval()

    def summed(batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        with torch.no_grad():
            total, count, _ = batch_sums(peft_model, {k: v for k, v in batch.items() if k != "labels"},
                                         batch["labels"])
        return float(total), int(count)

    padded, padded_n = summed(batcher.collate(examples))
    packed_rows = batcher.pack(examples, MAX_SEQ_LEN)
    packed, packed_n = summed(batcher.collate(packed_rows))
    return {"examples": n, "packed_rows": len(packed_rows), "padded_mean_loss": padded / padded_n,
            "packed_mean_loss": packed / packed_n, "supervised_tokens": [padded_n, packed_n],
            "abs_diff": abs(padded / padded_n - packed / packed_n),
            "equal": padded_n == packed_n and abs(padded - packed) / padded_n < 1e-4}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens and loop seconds summed over a side's runs, the tokens/s of that sum, and the first steps apart."""
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
            "first_step_seconds": [r["step_seconds"][0] for r in runs],
            "seconds_after_first_step": round(seconds - sum(r["step_seconds"][0] for r in runs), 3)}


def main() -> None:
    started = common.machine()
    with tempfile.TemporaryDirectory(prefix="g4t-bench-train-") as tmp:
        root = Path(tmp)
        model = common.bench_model()
        shape = common.model_shape(model)
        data = root / "chat.jsonl"
        described = common.lognormal_chat(data, ROWS, median_words=15, sigma=1.0, max_words=90)
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": [], "packed": []}
        for i, side in enumerate(ROUNDS):
            out = root / f"{i}-{side}"
            result = run_trl(model, data, out) if side == "trl" else run_ours(model, data, out,
                                                                            packing=side == "packed")
            result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            runs[side].append(result)
            print(f"{side}: {result['tokens_per_s']} tokens/s ({result['tokens']} tokens, {result['seconds']} s)",
                  flush=True)
        equality = packed_loss_equality(model, data)
    sides = {side: aggregate(r) for side, r in runs.items()}
    settings = {"batch_size": BATCH_SIZE, "max_seq_len": MAX_SEQ_LEN, "rank": RANK, "alpha": 2 * RANK, "lr": LR,
                "epochs": 1, "gradient_checkpointing": True, "dtype": "float32", "device": "cpu",
                "order": list(ROUNDS), "lora_targets": "language-model q/k/v/o/gate/up/down projections"}
    dataset = {**described, "encoded_rows": runs["ours"][0]["encoded_rows"],
               "packed_rows": runs["packed"][0]["encoded_rows"], "real_tokens": runs["ours"][0]["tokens"]}
    ratio = sides["ours"]["tokens_per_s"] / sides["trl"]["tokens_per_s"]
    first = {side: sorted({r["first_loss"] for r in runs[key]}) for side, key in (("gemma4_tune", "ours"),
                                                                                    ("trl_sft", "trl"))}
    params = {side: sorted({r["trainable_parameters"] for r in runs[key]}) for side, key in (("gemma4_tune", "ours"),
                                                                                           ("trl_sft", "trl"))}
    diff = abs(first["gemma4_tune"][0] - first["trl_sft"][0])
    same_work = {"first_step_loss": first, "first_step_loss_diff": diff, "trainable_parameters": params,
                 "tokens": [sides["ours"]["tokens"], sides["trl"]["tokens"]],
                 "same_batches": diff <= 1e-6 and params["gemma4_tune"] == params["trl_sft"]}
    common.write_result("train_throughput", started, {
        "what": "tokens/s of `gemma4-tune train` vs TRL SFTTrainer + PEFT LoraConfig (no packing)",
        "model": shape, "data": dataset, "settings": settings,
        "figures": {"gemma4_tune": sides["ours"], "trl_sft": sides["trl"]},
        "runs": {"gemma4_tune": runs["ours"], "trl_sft": runs["trl"]}, "same_work": same_work,
        "ratio": round(ratio, 3), "ratio_means": "gemma4-tune tokens/s / TRL tokens/s",
        "goal": common.goal(ratio, 1.0, at_least=True)})
    ratio = sides["packed"]["tokens_per_s"] / sides["ours"]["tokens_per_s"]
    common.write_result("packing", started, {
        "what": "tokens/s of `gemma4-tune train --packing` vs without, same data and settings",
        "model": shape, "data": dataset, "settings": settings,
        "figures": {"packed": sides["packed"], "unpacked": sides["ours"]},
        "runs": {"packed": runs["packed"], "unpacked": runs["ours"]},
        "loss": {"equality_same_examples": equality,
                 "mean_training_loss": {"packed": [r["mean_loss"] for r in runs["packed"]],
                                        "unpacked": [r["mean_loss"] for r in runs["ours"]],
                                        "note": "different batches (packing changes batch composition)"}},
        "ratio": round(ratio, 3), "ratio_means": "packed tokens/s / unpacked tokens/s",
        "goal": common.goal(ratio, 1.3, at_least=True)})


if __name__ == "__main__":
    main()
