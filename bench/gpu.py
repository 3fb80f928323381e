"""GPU section: the real-vocabulary comparison (bench/real_vocab.py) in bf16 on one CUDA device.

`gemma4-tune train` vs TRL SFTTrainer + PEFT (assistant-only loss), unpacked, and `train --packing` vs
TRL ``packing=True``, each side a fresh process, interleaved, on the model real_vocab.py builds (Gemma 4's
262,144 vocabulary at E2B's text width, 4 layers) or on the checkpoint in ``$GEMMA4_BENCH_MODEL`` /
``--model`` (a real Gemma 4 directory such as E2B-it). Like with like: gemma4-tune trains in bf16 on
CUDA, so TRL loads the model in bf16 too (``model_init_kwargs={"dtype": "bfloat16"}``, ``bf16=True``;
TRL's own default is to load in fp32). Per side: peak RSS, ``torch.cuda.max_memory_allocated``
(read by the training process itself), tokens/s, wall time, first-step loss, trainable parameters.
Sized to finish in under 5 minutes on one GPU (one round of the four sides, 96 conversations).

Skipped, with a message and a result that says so, when CUDA is absent. ``--dry-run`` builds the model
and the data (CPU) and exits, with or without CUDA.

Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import common
import real_vocab as rv

GPU_ROWS = 96  # 24 unpacked steps of batch 4
GPU_ROUNDS = 1


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("GEMMA4_BENCH_MODEL"),
                        help="Gemma 4 checkpoint directory [$GEMMA4_BENCH_MODEL, else the real-vocabulary model "
                             "bench/real_vocab.py builds]")
    parser.add_argument("--rows", type=int, default=GPU_ROWS, help=f"conversations [{GPU_ROWS}]")
    parser.add_argument("--rounds", type=int, default=GPU_ROUNDS, help=f"interleaved rounds [{GPU_ROUNDS}]")
    parser.add_argument("--dry-run", action="store_true", help="build the model and the data, then exit")
    args = parser.parse_args()
    started = common.machine()
    model_dir = Path(args.model) if args.model else None
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="g4t-bench-gpu-") as tmp:
            rv.measure(Path(tmp), rows=args.rows, steps=None, rounds=args.rounds, layers=4, model_dir=model_dir,
                       bf16=True, cuda=True, dry_run=True)
        print("gpu: dry run: model and data built; nothing measured")
        return
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device); run `make bench` on a GPU machine, with GEMMA4_BENCH_MODEL=<dir> "
              "for a real checkpoint")
        common.write_result("gpu", started, {"what": "GPU section (bf16)", "skipped": "no CUDA device",
                                             "ratio": None, "goal": None})
        return
    with tempfile.TemporaryDirectory(prefix="g4t-bench-gpu-") as tmp:
        payload = rv.measure(Path(tmp), rows=args.rows, steps=None, rounds=args.rounds, layers=4, model_dir=model_dir,
                             bf16=True, cuda=True)
    payload["model"]["path"] = str(model_dir) if model_dir else "built by bench/real_vocab.py (temp dir)"
    common.write_result("gpu", started, {
        "what": "GPU (bf16 on both sides): peak memory and tokens/s of gemma4-tune vs TRL SFTTrainer + PEFT at the "
                "real vocabulary, and --packing vs TRL packing=True",
        "device": torch.cuda.get_device_name(0), **payload})


if __name__ == "__main__":
    main()
