"""Preflight as a multiple of one training step plus model load, and `gemma4-tune verify` per engine.

Preflight, in a fresh process on the CPU-sized Gemma 4 with the training settings of
train_throughput.py: ``run_preflight`` (data, model load, LoRA, one real batch forward and backward,
checks), then the SFT unit's ``read_data`` + ``prepare`` alone (data, model load, LoRA: what a training run
pays before its first step), then one training step (forward, loss, backward and AdamW, gradient checkpointing on,
the second of two so the first's warm-up is left out). Verify: a rank-16 text adapter with random
factors and its streaming-merged checkpoint, then `gemma4-tune verify` once per engine (peft,
transformers, and vllm when `gemma4-tune engines status` says it is installed), each a fresh process.

Writes bench/results/preflight_verify.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from train_throughput import BATCH_SIZE, LR, MAX_SEQ_LEN, RANK

ROWS = 16


def preflight_figures(model: Path, data: Path, out: Path) -> dict[str, Any]:
    """Seconds of run_preflight, of the SFT run's preparation, and of one training step (run in a fresh process)."""
    import torch

    from gemma4_tune.api import run_preflight
    from gemma4_tune.config.options import RunConfig
    from gemma4_tune.train.methods.sft import METHOD as sft

    cfg = RunConfig(model=str(model), data=str(data), out=str(out), batch_size=BATCH_SIZE,
                    max_seq_len=MAX_SEQ_LEN, rank=RANK, lr=LR)
    started = time.perf_counter()
    result = run_preflight(cfg)
    preflight = time.perf_counter() - started
    started = time.perf_counter()
    setup = sft.prepare(cfg, sft.read_data(cfg))
    prepare = time.perf_counter() - started
    model_ = setup.model
    model_.train()
    model_.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model_.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=LR)
    batch = setup.batcher.collate(setup.examples[:BATCH_SIZE])
    steps = []
    for _ in range(2):
        started = time.perf_counter()
        model_(**batch).loss.backward()  # the token-mean loss (token_mean_loss left in 5964677)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - started)
    return {"preflight_seconds": round(preflight, 3), "preflight_self_reported_seconds": result.seconds,
            "preflight_batch_tokens": result.tokens_in_batch, "prepare_run_seconds": round(prepare, 3),
            "train_step_seconds": round(steps[1], 3), "first_step_seconds": round(steps[0], 3),
            "train_step_tokens": int(batch["attention_mask"].numel())}


def make_adapter(model: Path, out: Path) -> Path:
    """A rank-16 text adapter with random (non-zero) factors, saved in stock PEFT format."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    torch.manual_seed(0)
    peft_model, plan = prepare_model(Gemma4ForConditionalGeneration.from_pretrained(str(model)), "text",
                                     LoraSettings(rank=RANK))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return save_adapter(peft_model, out, plan=plan)


def in_fresh_process(call: str) -> str:
    """Run ``call`` (an expression over this module) in a fresh interpreter; its last stdout line."""
    code = f"import sys; sys.path.insert(0, {str(common.BENCH)!r}); import preflight_verify as pv; {call}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{call} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def cli_seconds(*args: str) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one `gemma4-tune` command (fresh process) and its --json output."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gemma4_tune", *args, "--json"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"gemma4-tune {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def vllm_installed() -> bool:
    """Whether `gemma4-tune engines status` reports vLLM installed."""
    proc = subprocess.run([sys.executable, "-m", "gemma4_tune", "engines", "status"], capture_output=True, text=True)
    return proc.returncode == 0 and "installed: True" in proc.stdout


def main() -> None:
    started = common.machine()
    model = common.bench_model()
    with tempfile.TemporaryDirectory(prefix="g4t-bench-preflight-") as tmp:
        root = Path(tmp)
        data = root / "chat.jsonl"
        described = common.lognormal_chat(data, ROWS, median_words=40, sigma=0.8, max_words=200)
        pf = json.loads(in_fresh_process(f"print(__import__('json').dumps(pv.preflight_figures("
                                         f"pv.Path({str(model)!r}), pv.Path({str(data)!r}), "
                                         f"pv.Path({str(root / 'run')!r}))))"))
        in_fresh_process(f"pv.make_adapter(pv.Path({str(model)!r}), pv.Path({str(root / 'adapter')!r}))")
        adapter, merged = root / "adapter", root / "merged"
        export_s, _ = cli_seconds("export", "--base", str(model), "--adapter", str(adapter), "--merged", str(merged))
        engines = ["peft", "transformers"] + (["vllm"] if vllm_installed() else [])
        verify: dict[str, Any] = {}
        for engine in engines:
            seconds, report = cli_seconds("verify", "--base", str(model), "--adapter", str(adapter), "--merged",
                                          str(merged), "--engine", engine, "--out", str(root / f"verify-{engine}"))
            verify[engine] = {"wall_seconds": round(seconds, 2), "ok": report["ok"]}
    reference = pf["prepare_run_seconds"] + pf["train_step_seconds"]
    ratio = pf["preflight_seconds"] / reference
    common.write_result("preflight_verify", started, {
        "what": "preflight wall time / (prepare_run (data + model load + LoRA) + one training step); "
                "`gemma4-tune verify` wall time per engine",
        "model": common.model_shape(model), "data": described,
        "settings": {"batch_size": BATCH_SIZE, "max_seq_len": MAX_SEQ_LEN, "rank": RANK,
                     "gradient_checkpointing": True, "engines": engines,
                     "vllm": "skipped: not installed (`make engines`)" if "vllm" not in engines else "installed"},
        "figures": {"preflight": pf, "export_merged_seconds": round(export_s, 2), "verify": verify},
        "ratio": round(ratio, 3), "ratio_means": "preflight seconds / (prepare_run + one step) seconds",
        "goal": None})


if __name__ == "__main__":
    main()
