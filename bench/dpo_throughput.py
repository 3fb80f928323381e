"""DPO throughput: `gemma4-tune train --method dpo` against TRL's DPOTrainer used plainly (bench/trl_dpo_baseline.py).

One CPU-sized Gemma 4 (E2B structure, ~35 M parameters), one JSONL of text preference pairs (prompt,
chosen and rejected of log-normal lengths), the same settings on both sides (batch size, length, rank,
alpha, lr, beta, one epoch, activation checkpointing, LoRA on the same modules: the plan's exact paths).
Both sides run TRL's own collator and loss, so the difference is what gemma4-tune adds around it (its
callbacks and the reference as the adapter disabled instead of TRL's second adapter copy); preflight and
the held-out evaluation run outside the timed loop. Each run is a fresh process, interleaved A B B A A B;
tokens are the attention mask of each [chosen; rejected] batch on both sides, counted over the training loop.

Writes bench/results/dpo_throughput.json.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import common

ROWS = 32
BATCH_SIZE = 4
MAX_LEN = 256
RANK = 16
LR = 5e-4
BETA = 0.1
ROUNDS = ("ours", "trl", "trl", "ours", "ours", "trl")
WHAT = ("`train --method dpo` vs TRL's DPOTrainer used plainly (TRL loads the model, LoRA through peft_config on "
        "the plan's modules), text preference pairs, one epoch; tokens/s over the training loop, same tokens on "
        "both sides (the [chosen; rejected] attention mask)")


def pairs(path: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """Text preference pairs (TRL's conversational rows) with log-normal prompt and answer lengths."""
    rng = random.Random(seed)

    def words(median: int) -> str:
        return " ".join(rng.choice(common.WORDS) for _ in range(max(1, min(90, int(rng.lognormvariate(0, 0.8) * median)))))

    with path.open("w") as f:
        for _ in range(rows):
            # conversational rows: both sides render them with the model's chat template (TRL would train
            # plain-string rows as raw text, gemma4-tune as a user turn and an answer)
            f.write(json.dumps({"prompt": [{"role": "user", "content": words(15)}],
                                "chosen": [{"role": "assistant", "content": words(20)}],
                                "rejected": [{"role": "assistant", "content": words(20)}]}) + "\n")
    return {"rows": rows, "median_prompt_words": 15, "median_answer_words": 20}


def run_ours(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """`gemma4-tune train --method dpo` in a fresh process; loop tokens and seconds from its metrics.jsonl."""
    settings = {"model": str(model), "data": str(data), "out": str(out), "method": "dpo", "beta": BETA,
                "batch_size": BATCH_SIZE, "max_seq_len": MAX_LEN, "rank": RANK, "lr": LR, "epochs": 1,
                "save_steps": 100_000, "samples": 0}
    run_file = out.with_suffix(".yaml")
    run_file.write_text(yaml.safe_dump(settings))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gemma4_tune", "train", str(run_file)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"gemma4-tune train --method dpo failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    seconds = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
    record = json.loads((out / "run.json").read_text())
    return {"tokens": rows[-1]["tokens"], "seconds": round(seconds, 3), "tokens_per_s": rows[-1]["tokens_per_s"],
            "steps": len(rows), "first_loss": rows[0]["loss"], "wall_seconds": round(time.perf_counter() - started, 1),
            "trainable_parameters": record["plan"]["trainable"]["total"]}


def run_trl(model: Path, data: Path, out: Path, targets: Path) -> dict[str, Any]:
    """bench/trl_dpo_baseline.py in a fresh process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(common.BENCH / "trl_dpo_baseline.py"), str(model), str(data), str(out),
                           str(targets), "--batch-size", str(BATCH_SIZE), "--max-len", str(MAX_LEN), "--rank",
                           str(RANK), "--lr", str(LR), "--beta", str(BETA)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"TRL DPO baseline failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    from gemma4_tune.api import plan

    started = common.machine()
    with tempfile.TemporaryDirectory(prefix="g4t-bench-dpo-") as tmp:
        root = Path(tmp)
        model = common.bench_model()
        data = root / "pairs.jsonl"
        described = pairs(data, ROWS)
        targets = root / "targets.json"
        targets.write_text(json.dumps(plan(model, "text", rank=RANK)[1].target_modules))
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for i, side in enumerate(ROUNDS):
            out = root / f"{i}-{side}"
            runs[side].append(run_ours(model, data, out) if side == "ours" else run_trl(model, data, out, targets))
            print(side, runs[side][-1], flush=True)
    sums = {side: {"tokens": sum(r["tokens"] for r in rs), "seconds": round(sum(r["seconds"] for r in rs), 3)}
            for side, rs in runs.items()}
    for side in sums:
        sums[side]["tokens_per_s"] = round(sums[side]["tokens"] / sums[side]["seconds"], 2)
    ratio = sums["ours"]["tokens_per_s"] / sums["trl"]["tokens_per_s"]
    same_tokens = ({r["tokens"] for r in runs["ours"]} == {r["tokens"] for r in runs["trl"]}
                 and {r["trainable_parameters"] for r in runs["ours"]} == {r["trainable_parameters"] for r in runs["trl"]})
    path = common.write_result("dpo_throughput", started, {
        "what": WHAT, "model": common.model_shape(model), "data": described,
        "settings": {"batch_size": BATCH_SIZE, "max_len": MAX_LEN, "rank": RANK, "lr": LR, "beta": BETA, "epochs": 1},
        "runs": runs, "sides": sums, "same_tokens": same_tokens,
        "ratio_tokens_per_s_ours_over_trl": round(ratio, 3), "goal": common.goal(ratio, 0.95, at_least=True)})
    print(path)


if __name__ == "__main__":
    main()
