"""QLoRA beside LoRA, and the QLoRA merge gap (issue 32, failure-catalog row 38).

1. ``memory_speed``: `gemma4-tune train` on the real-vocabulary E2B-width model of ``real_vocab.py`` (262,144
   tokens, hidden 1536, 4 layers, the benchmark vision tower) with and without ``--quantize 4bit``, same data,
   LoRA, steps and seed; interleaved rounds, each side a fresh process under ``/usr/bin/time -v``: peak RSS, RSS at
   the start of the training loop (the weights), tokens/s. Ratios are QLoRA / LoRA.
2. ``merge_gap``: one QLoRA run (text, vision and audio LoRA on the tiny E2B; text and vision on the E2B-width
   model), then the model as trained (the 4-bit base + adapter in PEFT, ``verify.reference``) against
   (a) the adapter merged into the original weights (``export --merge-into original``: what most tools do),
   (b) merged into the dequantized 4-bit weights (``export --merged``, the default), and (c) PEFT's own
   ``merge_and_unload`` on the 4-bit model (each layer dequantized, the delta added, quantized again):
   max |logit difference| and greedy agreement over verify's text and image prompts (every attended position).

Writes bench/results/qlora.json. ``--part memory_speed|merge_gap`` runs one part.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import real_vocab as rv

STEPS = 8
ROUNDS = 2
GAP_LR = 1e-2


def run_side(model: Path, data: Path, out: Path, *, quantize: bool) -> dict[str, Any]:
    """One `gemma4-tune train` side (``real_vocab.run_ours``'s measurement) with or without 4-bit weights."""
    import yaml

    run_file = rv.ours_settings(model, data, out, packing=False, steps=STEPS)
    settings = yaml.safe_load(run_file.read_text())
    if quantize:
        settings["quantize"] = "4bit"
    run_file.write_text(yaml.safe_dump(settings))
    stats = out / "stats.json"
    cmd = [sys.executable, str(Path(rv.__file__).resolve()), "_run", "ours", "--run-file", str(run_file),
           "--stats-out", str(stats)]
    _, timed = rv._measured(cmd, out, "gemma4-tune train")
    timed.update(json.loads(stats.read_text()))
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    seconds = rows[-1]["tokens"] / rows[-1]["tokens_per_s"]
    return {**timed, "tokens": rows[-1]["tokens"], "tokens_per_s": round(rows[-1]["tokens"] / seconds, 2),
            "first_loss": rows[0]["loss"], "steps": len(rows)}


def memory_speed(root: Path) -> dict[str, Any]:
    """QLoRA and LoRA side by side on the real-vocabulary model, ``ROUNDS`` interleaved rounds."""
    model = rv.build_model(root / "model")
    data = rv.sft_chat(root / "data", 48)
    runs: dict[str, list[dict[str, Any]]] = {"lora": [], "qlora": []}
    for r in range(ROUNDS):
        for side in runs:
            print(f"round {r + 1}/{ROUNDS}: {side}", file=sys.stderr)
            runs[side].append(run_side(model, root / "data" / "chat.jsonl", root / f"{side}-{r}",
                                       quantize=side == "qlora"))
    med = {side: {k: common.median([x[k] for x in rs]) for k in ("peak_rss_mb", "tokens_per_s")}
           for side, rs in runs.items()}
    loop = {side: common.median([x["rss_mb_at_train_begin"] for x in rs]) for side, rs in runs.items()}
    same_first_loss = abs(runs["lora"][0]["first_loss"] - runs["qlora"][0]["first_loss"])
    return {"model": common.model_shape(model), "data": data, "steps": STEPS, "rounds": ROUNDS, "runs": runs,
            "median": med, "rss_at_loop_start_mb": loop,
            "peak_rss_ratio": round(med["qlora"]["peak_rss_mb"] / med["lora"]["peak_rss_mb"], 3),
            "tokens_per_s_ratio": round(med["qlora"]["tokens_per_s"] / med["lora"]["tokens_per_s"], 3),
            "same_work": {"tokens": [x["tokens"] for x in runs["lora"]] == [x["tokens"] for x in runs["qlora"]],
                          "first_loss_gap": same_first_loss}}


def _compare(reference: dict[str, Any], got: dict[str, Any], masks: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for m, ref in reference.items():
        mask = masks[m]
        out[m] = {"max_logit_diff": float((got[m] - ref)[mask].abs().max()),
                  "greedy_agreement": round(float((got[m].argmax(-1) == ref.argmax(-1))[mask].float().mean()), 4),
                  "positions": int(mask.sum())}
    return out


def merge_gap(model: Path, data: Path, root: Path, targets: str) -> dict[str, Any]:
    """Train QLoRA, then the trained model against the three merges (see the module docstring)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from gemma4_tune.api import RunConfig, run_training
    from gemma4_tune.export.merge import merge_adapter
    from gemma4_tune.verify.prompts import batches as verification_batches
    from gemma4_tune.verify.reference import load_tuned, logits_by_modality

    run = root / "run"
    run_training(RunConfig(model=str(model), data=str(data), out=str(run), quantize="4bit", targets=targets,
                           max_steps=STEPS, lr=GAP_LR, samples=0, max_seq_len=512))
    adapter = run / "adapter"
    batches = {m: b for m, b in verification_batches(model).items() if m in ("text", "image")}
    masks = {m: b["attention_mask"].bool() for m, b in batches.items()}
    trained = logits_by_modality(model, adapter, batches)["tuned"]
    result: dict[str, Any] = {"targets": targets, "steps": STEPS, "lr": GAP_LR}
    for into in ("original", "dequantized"):
        merged = merge_adapter(model, adapter, root / f"merged-{into}", progress=False, into=into)
        loaded = AutoModelForImageTextToText.from_pretrained(str(merged.out_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            got = {m: loaded(**b).logits.float() for m, b in batches.items()}
        result[f"merged into the {into} weights"] = _compare(trained, got, masks)
        del loaded
        shutil.rmtree(merged.out_dir)
    peft_merged = load_tuned(model, adapter).merge_and_unload().eval()
    with torch.no_grad():
        got = {m: peft_merged(**b).logits.float() for m, b in batches.items()}
    result["PEFT merge_and_unload on the 4-bit model"] = _compare(trained, got, masks)
    result["effect of the adapter (trained vs 4-bit base)"] = _compare(
        trained, logits_by_modality(model, None, batches)["base"], masks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory_speed", "merge_gap"))
    args = parser.parse_args()
    started = common.machine()
    payload: dict[str, Any] = {"what": "QLoRA beside LoRA (memory, tokens/s) on the real-vocabulary E2B-width model, "
                               "and the QLoRA merge gap: the trained 4-bit model against the merge into the original "
                               "weights, into the dequantized weights and PEFT's merge_and_unload (bench/qlora.py)."}
    with tempfile.TemporaryDirectory(prefix="g4t-bench-qlora-") as tmp:
        root = Path(tmp)
        if args.part in (None, "merge_gap"):
            from gemma4_tune.api import tiny_model
            from gemma4_tune.data.demo_data import write_demo_dataset

            tiny = tiny_model("e2b", root / "tiny-e2b", seed=0)
            demo = write_demo_dataset(root / "demo", n=24)
            payload["merge_gap"] = {"tiny e2b": merge_gap(tiny, demo, root / "gap-tiny", "text,vision,audio")}
            wide = rv.build_model(root / "wide")
            rv.sft_chat(root / "wide-data", 24)
            payload["merge_gap"]["e2b width, vocabulary 262,144"] = merge_gap(
                wide, root / "wide-data" / "chat.jsonl", root / "gap-wide", "text,vision")
        if args.part in (None, "memory_speed"):
            payload["memory_speed"] = memory_speed(root / "memory")
    print(common.write_result("qlora", started, payload))


if __name__ == "__main__":
    main()
