"""GPU section: training throughput of `gemma4-tune train` vs TRL SFTTrainer, and --packing, in bf16 on CUDA.

Skipped, with a message and a result that says so, when CUDA is absent. The model is the checkpoint
in ``$GEMMA4_BENCH_MODEL`` (or ``--model``; a real Gemma 4 directory such as E2B-it), else the
CPU-sized benchmark model. The sides run interleaved as in train_throughput.py, each in
a fresh process; TRL gets ``--bf16`` as gemma4-tune uses bf16 on CUDA.

Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import common
import train_throughput as tt

GPU_ROWS = 256
GPU_BATCH_SIZE = 8
GPU_MAX_SEQ_LEN = 1024


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("GEMMA4_BENCH_MODEL"),
                        help="Gemma 4 checkpoint directory [$GEMMA4_BENCH_MODEL, else the CPU-sized model]")
    args = parser.parse_args()
    started = common.machine()
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device); run `make bench` on a GPU machine, with GEMMA4_BENCH_MODEL=<dir> "
              "for real sizes")
        common.write_result("gpu", started, {"what": "GPU section (bf16)", "skipped": "no CUDA device",
                                             "ratio": None, "goal": None})
        return
    tt.BATCH_SIZE, tt.MAX_SEQ_LEN = GPU_BATCH_SIZE, GPU_MAX_SEQ_LEN
    model = Path(args.model) if args.model else common.bench_model()
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": [], "packed": []}
    with tempfile.TemporaryDirectory(prefix="g4t-bench-gpu-") as tmp:
        root = Path(tmp)
        data = root / "chat.jsonl"
        described = common.lognormal_chat(data, GPU_ROWS, median_words=120, sigma=0.8, max_words=700)
        for i, side in enumerate(tt.ROUNDS):
            out = root / f"{i}-{side}"
            runs[side].append(tt.run_trl(model, data, out, bf16=True) if side == "trl"
                              else tt.run_ours(model, data, out, packing=side == "packed"))
    sides = {side: tt.aggregate(r) for side, r in runs.items()}
    vs_trl = sides["ours"]["tokens_per_s"] / sides["trl"]["tokens_per_s"]
    packing = sides["packed"]["tokens_per_s"] / sides["ours"]["tokens_per_s"]
    common.write_result("gpu", started, {
        "what": "GPU (bf16): tokens/s of gemma4-tune vs TRL SFTTrainer, and --packing vs without",
        "device": torch.cuda.get_device_name(0), "model": {"path": str(model), **common.model_shape(model)},
        "data": described, "settings": {"batch_size": GPU_BATCH_SIZE, "max_seq_len": GPU_MAX_SEQ_LEN,
                                        "rank": tt.RANK, "lr": tt.LR, "dtype": "bfloat16"},
        "figures": sides, "runs": runs,
        "ratios": {"vs_trl": round(vs_trl, 3), "packing": round(packing, 3)},
        "ratio": round(vs_trl, 3), "ratio_means": "gemma4-tune tokens/s / TRL tokens/s",
        "goals": {"vs_trl": common.goal(vs_trl, 1.0, at_least=True),
                  "packing": common.goal(packing, 1.3, at_least=True)}})


if __name__ == "__main__":
    main()
