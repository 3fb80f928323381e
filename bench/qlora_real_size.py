"""QLoRA dress rehearsal at real size on this CPU (issue 32): a Gemma 4 built from its published config, loaded in
4 bits from a random checkpoint, trained for one step, its peak memory beside `gemma4-tune doctor`'s estimate.

The checkpoint is built by ``export_real_size.build_base`` (as for the E2B there): the model on the meta device
gives the key set and shapes (under the names the checkpoint stores them by, the tied ``lm_head`` left out), and
tensors are written one at a time, seeded, in bf16; the tiny model's tokenizer (padded to the real 262,144 ids)
and processor files go beside it. Nothing is downloaded.

The run is `gemma4-tune train --quantize 4bit` (the CLI, a fresh process under ``/usr/bin/time -v``): text LoRA of
rank 16, preflight, one optimizer step on short chat rows, the saved adapter's reload check. Its peak RSS counts the
checkpoint's file pages that loading maps; its peak anonymous RSS (sampled) is the memory it allocated, the figure
to hold against doctor's estimate. On the CPU the weights bitsandbytes
does not quantize (embeddings, norms) are held in fp32, where doctor's estimate counts bf16 (a GPU run): the
result gives both.

``--variant 12b`` (default; 24 GB of bf16, about 30 minutes here) or ``31b`` (62 GB: needs that much free disk and
more memory than this 24 GB machine has for its fp32 embeddings). Writes bench/results/qlora_real_size_<variant>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
import export_real_size as ers
import real_vocab as rv

SHARD_MB = 4000
ROWS = 8

#: The run, in a child that samples its anonymous resident memory (``RssAnon``: the memory the process allocated,
#: without the checkpoint's file pages that loading maps and the kernel may drop) every 0.2 s.
CHILD = r"""
import json, runpy, sys, threading, time
out, run_file = sys.argv[1:3]
peak = {"rss_anon_kb": 0}
def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    peak["rss_anon_kb"] = max(peak["rss_anon_kb"], int(line.split()[1]))
        time.sleep(0.2)
threading.Thread(target=sample, daemon=True).start()
sys.argv = ["gemma4-tune", "train", run_file]
try:
    runpy.run_module("gemma4_tune", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    if exc.code:
        raise
open(out, "w").write(json.dumps(peak))
"""


def rehearse(model: Path, work: Path) -> dict[str, Any]:
    """One QLoRA step through the CLI, measured; doctor's estimate for the same settings beside it."""
    import yaml

    shutil.rmtree(work, ignore_errors=True)  # a rerun on a kept checkpoint starts a new run
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(ROWS)]
    work.mkdir(parents=True, exist_ok=True)
    (work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"model": str(model), "data": str(work / "chat.jsonl"), "out": str(work / "run"), "quantize": "4bit",
                "targets": "text", "rank": 16, "max_steps": 1, "batch_size": 1, "max_seq_len": 128,
                "save_steps": 100_000, "samples": 0, "seed": 0}
    (work / "run.yaml").write_text(yaml.safe_dump(settings))
    stats = work / "stats.json"
    cmd = [sys.executable, "-c", CHILD, str(stats), str(work / "run.yaml")]
    _, timed = rv._measured(cmd, work / "measure", "gemma4-tune train --quantize 4bit")
    timed.update(json.loads(stats.read_text()))
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x]
    manifest = json.loads((work / "run" / "adapter" / "gemma4_tune_manifest.json").read_text())["quantization"]
    doctor = subprocess.run([sys.executable, "-c", "from gemma4_tune.cli import main; main()", "doctor", "--model",
                             str(model), "--quantize", "4bit", "--json"], capture_output=True, text=True)
    estimate = json.loads(doctor.stdout)["memory"]
    gib = 1024
    return {"run": timed, "loss": [m.get("loss") for m in metrics if "loss" in m],
            "quantized_modules": len(manifest["modules"]), "doctor_estimate_gib": estimate,
            "peak_rss_gib": round(timed["peak_rss_mb"] / gib, 2),
            "peak_rss_anon_gib": round(timed["rss_anon_kb"] / gib**2, 2),
            "peak_anon_vs_estimate": round(timed["rss_anon_kb"] / gib**2 / estimate["total"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="12b")
    parser.add_argument("--work", type=Path, help="build (or reuse) the checkpoint here instead of a temp folder")
    args = parser.parse_args()
    started = common.machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="g4t-qlora-real-"))
    try:
        model = work / f"{args.variant}-random"
        built = json.loads((model / "built.json").read_text()) if (model / "built.json").is_file() else None
        if built is None:
            built = ers.build_base(model, variant=args.variant, shard_mb=SHARD_MB)
            (model / "built.json").write_text(json.dumps(built))
        payload = {"what": f"QLoRA at real size on the CPU: the {args.variant} from its published config as a random "
                           "bf16 checkpoint, loaded in 4 bits, one training step; peak memory against doctor's "
                           "estimate (bench/qlora_real_size.py).",
                   "variant": args.variant, "checkpoint": built, **rehearse(model, work / "rehearsal")}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(common.write_result(f"qlora_real_size_{args.variant}", started, payload))


if __name__ == "__main__":
    main()
