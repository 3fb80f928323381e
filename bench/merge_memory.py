"""Peak memory of the streaming merge on a Gemma 4 checkpoint of at least 2 GB (CPU, fp32).

Builds a synthetic Gemma 4 (the 31B-shaped tiny config widened until its safetensors exceed
2 GB), a rank-16 text LoRA with random factors, then runs `gemma4-tune export --merged` in a
fresh process and reads its peak RSS. Writes bench/results/merge_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def build(root: Path) -> tuple[Path, Path]:
    """Base checkpoint and adapter (run in its own process: see main)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.adapters import LoraSettings, prepare_model, save_adapter
    from gemma4_tune.api import tiny_model
    from gemma4_tune.catalog import tiny

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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="g4t-bench-merge-") as tmp:
        root = Path(tmp)
        # Build in another process: a child forked from a parent holding the 2.5 GB model would
        # report that memory as its own ru_maxrss.
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import merge_memory; merge_memory.build(__import__('pathlib').Path({str(root)!r}))"],
                       check=True, capture_output=True)
        base, adapter = root / "base", root / "adapter"
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", "from gemma4_tune.cli import main; main()", "export",
                               "--base", str(base), "--adapter", str(adapter), "--merged", str(root / "merged"),
                               "--json"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        merged = json.loads(proc.stdout)["merged"]
        idle = subprocess.run([sys.executable, "-c", "import resource, gemma4_tune.cli, gemma4_tune.api, torch, "
                               "transformers; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, check=True)
        baseline_mb = float(idle.stdout.strip().splitlines()[-1])
        result = {"checkpoint_bytes": size, "checkpoint_gb": round(size / 1e9, 3),
                  "merge_seconds": merged["seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
                  "peak_rss_mb": merged["peak_rss_mb"], "import_baseline_rss_mb": round(baseline_mb, 1),
                  "merge_rss_above_imports_mb": round(merged["peak_rss_mb"] - baseline_mb, 1),
                  "peak_rss_over_model_size": round(merged["peak_rss_mb"] * 1024**2 / size, 3),
                  "tensors_merged": merged["tensors_merged"], "shards": len(merged["shards"])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
