"""Shared pieces of the benchmarks: the CPU-sized Gemma 4, the data, and the result record.

Every benchmark writes ``bench/results/<name>.json`` through ``write_result``, which records the
machine (CPU count, load average at start and end), library versions, the figures, the ratio and
whether the goal is met. Nothing here decides a result: goals are only compared with measurements.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# The Gemma 4 text width used by the CPU benchmarks: E2B's structure (PLE, KV sharing, double-wide
# MLP on shared layers, clipped vision/audio towers) at about 35 M parameters.
BENCH_TEXT = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64, "global_head_dim": 128, "hidden_size_per_layer_input": 64}
BENCH_VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 6,
                "num_key_value_heads": 6, "head_dim": 64}
WORDS = ("the quick brown fox jumps over lazy dog model answers user in short helpful way what is this picture "
         "describe sound colour square red green blue translate sentence into french summarise paragraph write "
         "haiku about autumn rain gemma family open models fine tuning adapts task with small dataset weather "
         "today sunny light breeze tomorrow it will afternoon question how many legs does spider have answer "
         "eight two plus four").split()


#: A small parent process (``python -c MEASURE_CHILDREN cmd ...``): runs the command, prints its wall time and
#: the peak RSS of its process tree (a child forked from a parent holding a model would count the parent's pages).
MEASURE_CHILDREN = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
                    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                    "print(json.dumps({'rc': p.returncode, 'seconds': time.perf_counter() - t, "
                    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
                    "'stdout': p.stdout[-20000:], 'stderr': p.stderr[-4000:]}))")


def machine() -> dict[str, Any]:
    """CPU count, platform and the current load average."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or None,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the figures."""
    from gemma4_tune.train.base import library_versions

    return library_versions()


def write_result(name: str, started: dict[str, Any], payload: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` with the machine record (load at start and end) and versions."""
    record = {"name": name, "machine": {**started, "loadavg_start": started["loadavg"],
                                        "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "versions": versions(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    del record["machine"]["loadavg"]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def goal(ratio: float, target: float, *, at_least: bool) -> dict[str, Any]:
    """A goal and whether ``ratio`` meets it; ``by`` is the shortfall as a fraction of the target."""
    met = ratio >= target if at_least else ratio <= target
    return {"target": f"{'>=' if at_least else '<='} {target}", "ratio": round(ratio, 3), "met": met,
            "missed_by": None if met else round(abs(ratio - target) / target, 3)}


def bench_model(variant: str = "e2b") -> Path:
    """The CPU-sized Gemma 4 (``BENCH_TEXT``/``BENCH_VISION`` widths), built once through ``tiny_model``.

    Cached in ``runs/bench/`` under a key of the widths and the tiny-model builder's source, so a
    changed builder builds afresh. Built in a fresh interpreter so the widened tiny config never
    leaks into the caller.
    """
    import hashlib

    from gemma4_tune.model import tiny

    key = hashlib.sha256(json.dumps([variant, BENCH_TEXT, BENCH_VISION]).encode()
                         + Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    out = BENCH.parent / "runs" / "bench" / f"model-{variant}-{key}"
    if not (out / "config.json").exists():
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from gemma4_tune.model import tiny; "
                "from gemma4_tune.api import tiny_model; import common; tiny.TINY_TEXT.update(common.BENCH_TEXT); "
                "tiny.TINY_VISION.update(common.BENCH_VISION); tiny_model(sys.argv[2], sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, str(BENCH), variant, str(out)], check=True, capture_output=True)
    return out


def model_shape(path: Path) -> dict[str, Any]:
    """Parameter counts (total, text, vision) and text layers/hidden of a model directory."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg = Gemma4Config.from_pretrained(str(path))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg)
    count = {"total": 0, "text": 0, "vision": 0, "audio": 0}
    for name, p in model.named_parameters():
        count["total"] += p.numel()
        for tower in ("vision", "audio"):
            if f"{tower}_tower" in name or f"embed_{tower}" in name:
                count[tower] += p.numel()
                break
        else:
            count["text"] += p.numel()
    text = cfg.text_config
    return {"parameters": count, "text_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size,
            "vision_layers": cfg.vision_config.num_hidden_layers if cfg.vision_config else None,
            "vision_hidden": cfg.vision_config.hidden_size if cfg.vision_config else None}


def lognormal_chat(path: Path, rows: int, *, median_words: int, sigma: float, max_words: int,
                   seed: int = 0) -> dict[str, Any]:
    """Text-only chat JSONL (messages rows) whose answer lengths are log-normal; returns its description."""
    rng = random.Random(seed)
    lengths = []
    with path.open("w") as f:
        for _ in range(rows):
            n = min(max_words, max(1, round(rng.lognormvariate(math.log(median_words), sigma))))
            lengths.append(n)
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "?"
            answer = " ".join(rng.choice(WORDS) for _ in range(n)) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    lengths.sort()
    return {"path": path.name, "rows": rows, "answer_words": {"distribution": f"log-normal(median {median_words}, "
                                                                              f"sigma {sigma}), cut at {max_words}",
                                                              "min": lengths[0], "median": lengths[rows // 2],
                                                              "p90": lengths[int(rows * 0.9)], "max": lengths[-1]}}


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
