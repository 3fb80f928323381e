"""Streaming merge against PEFT ``merge_and_unload`` + ``save_pretrained``, on a checkpoint of >= 2 GB.

Builds a synthetic Gemma 4 (the 31B-shaped tiny config widened until its safetensors exceed
2 GB, fp32) and a rank-16 text LoRA with random factors. Then, each in a fresh process started
from a small parent that reads ``RUSAGE_CHILDREN`` (a child forked from a parent holding a model
would count the parent's pages as its own): `gemma4-tune export --merged`, and the baseline a user
of stock PEFT writes (load base, ``PeftModel.from_pretrained``, ``merge_and_unload``,
``save_pretrained``). Merge speed is set against ``shutil.copyfile`` of the same shards (the disk's
limit; the files are in the page cache for every side alike). Writes bench/results/merge_memory.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common


def build(root: Path) -> tuple[Path, Path]:
    """Base checkpoint and adapter (run in its own process: see main)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.api import tiny_model
    from gemma4_tune.model import tiny
    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    tiny.TINY_TEXT.update(hidden_size=1536, intermediate_size=8192)
    base = tiny_model("31b", root / "base")
    config = json.loads((base / "config.json").read_text())
    config["text_config"].update(vocab_size=262144)
    (base / "config.json").write_text(json.dumps(config))
    from transformers import Gemma4Config

    cfg = Gemma4Config.from_pretrained(str(base))
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(cfg)
    model.save_pretrained(str(base), max_shard_size="1GB")
    (base / "model.safetensors").unlink(missing_ok=True)
    model, plan = prepare_model(model, "text", LoraSettings(rank=16))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    adapter = save_adapter(model, root / "adapter", plan=plan)
    return base, adapter


def peft_merge(base: Path, adapter: Path, out: Path) -> None:
    """The baseline, as PEFT's docs show it: load, merge_and_unload, save_pretrained."""
    from peft import PeftModel
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(str(base))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), max_shard_size="2GB")


def measured(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` under the small parent; its wall seconds, peak RSS (MB) and output."""
    proc = subprocess.run([sys.executable, "-c", common.MEASURE_CHILDREN, *cmd], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout)
    if result["rc"]:
        raise RuntimeError(f"{cmd[:4]} failed:\n{result['stderr']}")
    return result


def copy_seconds(shards: list[Path], dest: Path) -> float:
    """Seconds to ``shutil.copyfile`` every shard into ``dest`` (then removed)."""
    dest.mkdir()
    started = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, dest / shard.name)
    seconds = time.perf_counter() - started
    shutil.rmtree(dest)
    return seconds


def main() -> None:
    started = common.machine()
    here = str(Path(__file__).parent)
    with tempfile.TemporaryDirectory(prefix="g4t-bench-merge-") as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import merge_memory; "
                        f"merge_memory.build(__import__('pathlib').Path({str(root)!r}))"],
                       check=True, capture_output=True)
        base, adapter = root / "base", root / "adapter"
        shards = sorted(base.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        copies = [copy_seconds(shards, root / "copy")]
        ours = measured([sys.executable, "-m", "gemma4_tune", "export", "--base", str(base), "--adapter",
                         str(adapter), "--merged", str(root / "merged"), "--json"])
        merged = json.loads(ours["stdout"])["merged"]
        shutil.rmtree(root / "merged")
        baseline = measured([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import merge_memory; "
                             f"from pathlib import Path; merge_memory.peft_merge(Path({str(base)!r}), "
                             f"Path({str(adapter)!r}), Path({str(root / 'peft-merged')!r}))"])
        shutil.rmtree(root / "peft-merged")
        copies.append(copy_seconds(shards, root / "copy"))
        idle = measured([sys.executable, "-c", "import gemma4_tune.cli, gemma4_tune.api, torch, transformers"])
    copy_s = common.median(copies)
    mb = size / 1e6
    rss_ratio = ours["peak_rss_mb"] / baseline["peak_rss_mb"]
    time_ratio = ours["seconds"] / baseline["seconds"]
    speed_ratio = (mb / merged["seconds"]) / (mb / copy_s)
    common.write_result("merge_memory", started, {
        "what": "`gemma4-tune export --merged` (streaming) vs PEFT merge_and_unload + save_pretrained, "
                "each a fresh process; merge speed vs shutil.copyfile of the same shards",
        "model": {"checkpoint_bytes": size, "checkpoint_gb": round(size / 1e9, 3), "shards": len(shards),
                  "dtype": "float32", "shape": "31B structure, hidden 1536, intermediate 8192, vocab 262144",
                  "adapter": "rank 16, text attention + MLP"},
        "figures": {
            "streaming": {"peak_rss_mb": round(ours["peak_rss_mb"], 1), "wall_seconds": round(ours["seconds"], 2),
                          "merge_seconds": round(merged["seconds"], 2),
                          "merge_mb_per_s": round(mb / merged["seconds"], 1),
                          "self_reported_peak_rss_mb": merged["peak_rss_mb"],
                          "tensors_merged": merged["tensors_merged"]},
            "peft_merge_and_unload": {"peak_rss_mb": round(baseline["peak_rss_mb"], 1),
                                      "wall_seconds": round(baseline["seconds"], 2)},
            "copy": {"seconds": [round(c, 2) for c in copies], "mb_per_s": round(mb / copy_s, 1)},
            "import_only_peak_rss_mb": round(idle["peak_rss_mb"], 1)},
        "ratios": {"peak_rss": round(rss_ratio, 3), "wall_time": round(time_ratio, 3),
                   "merge_speed_vs_copy": round(speed_ratio, 3)},
        "ratio": round(rss_ratio, 3), "ratio_means": "streaming peak RSS / PEFT peak RSS",
        "goals": {"peak_rss": common.goal(rss_ratio, 0.25, at_least=False),
                  "wall_time": common.goal(time_ratio, 1.0, at_least=False),
                  "merge_speed_vs_copy": common.goal(speed_ratio, 0.3, at_least=True)}})


if __name__ == "__main__":
    main()
