"""Export at real size: merge and GGUF conversion of an E2B-sized checkpoint, against `cp` and PEFT.

Builds (seeded, in a work directory) a checkpoint of the real Gemma 4 E2B size and key set without
downloading anything: the published E2B config (``model/variants/gemma-4-e2b.json``), the model
built on the meta device for its key set, shapes and dtypes (clamp buffers included, the tied
``lm_head`` left out as the published files do), plus the k/v/k_norm keys of the KV-shared layers
that official files carry (row 7). Tensors are written one at a time with random values, bf16, in
4 shards. The tiny tokenizer (padded to the real 262,144 ids) and processor files go beside it so
llama.cpp's converter can read it. The adapter is rank-16 LoRA on the text and vision tower linears,
made by ``gemma4_tune.plan.adapters.prepare_model`` on the meta model (the user's code path), with random
factors.

Sides, each a fresh process (peak RSS of the process tree from ``RUSAGE_CHILDREN``), on a cold page
cache (inputs synced and evicted with ``posix_fadvise(DONTNEED)`` before each side), timed to the end
of a ``sync`` so that written data is on disk for every side alike:

- ``cp``: ``cp`` of the base shards (the disk's own speed for this much data);
- ``merge``: ``gemma4-tune export --merged`` (CLI);
- ``peft``: what a stock PEFT user writes: ``from_pretrained`` (bf16), ``PeftModel.from_pretrained``,
  ``merge_and_unload()``, ``save_pretrained``;
- ``gguf``: ``gemma4_tune.export.gguf.export_gguf(merged, out, "bf16")`` (text model + mmproj).

Exactness: every unchanged tensor of the merge is compared byte for byte with the base; sampled
merged tensors with the fp32 reference (PEFT's operations in fp32, rounded once) and with PEFT's
own bf16 ``merge_and_unload``. The disk space needed is checked first; where it is missing the
benchmark says so and writes nothing.

Writes bench/results/export_real_size.json. ``--keep DIR`` builds (or reuses) the checkpoint there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

VARIANT = "gemma-4-e2b"
VOCAB = 262_144
RANK = 16
TARGETS = "text,vision"
SHARD_MB = 2700  # 4 shards of the 10.25 GB checkpoint
SEED = 0
SAMPLED_MERGED = 24
CHUNK = 16 * 1024 * 1024  # elements generated at a time
SIDES = ("cp", "merge", "peft", "gguf")
DISK_FACTOR = 3.3  # base + merged + the largest of (cp copy, PEFT's merge, GGUF files), with a margin

PEFT_MERGE = r"""
import sys, torch
from peft import PeftModel
from transformers import Gemma4ForConditionalGeneration
base, adapter, out = sys.argv[1:4]
model = Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="2700MB")
"""

GGUF = r"""
import sys
from gemma4_tune.export.gguf import export_gguf
export_gguf(sys.argv[1], sys.argv[2], "bf16", repoint=False)
"""


# ---------------------------------------------------------------------------------------------- building


def real_config(variant: str = VARIANT) -> dict[str, Any]:
    """The published config of ``variant`` (a catalog name)."""
    from gemma4_tune.model.catalog import resolve_variant

    return json.loads(json.dumps(resolve_variant(variant).config))


def key_set(variant: str = VARIANT, rename: Any = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype) of every tensor the published checkpoint of ``variant`` holds: the model's
    on the meta device, the tied ``lm_head`` left out, the KV-shared layers' k/v/k_norm added (row 7); ``rename``
    maps a module-tree name to the checkpoint's (``export.manifest.checkpoint_names``)."""
    from gemma4_tune.model.tiny import kv_shared_keys
    from gemma4_tune.plan.overview import meta_model

    module, _ = meta_model(variant)
    rename = rename or (lambda key: key)
    text = module.config.get_text_config()
    tied = {"lm_head.weight"} if text.tie_word_embeddings else set()
    out = {rename(name): (tuple(t.shape), "BF16" if t.is_floating_point() else "I64")
           for name, t in module.state_dict().items() if name not in tied}
    out.update({name: (shape, "BF16") for name, shape in kv_shared_keys(text).items()})
    return out


def _fill(name: str, n: int, gen: Any, buf: Any) -> Any:
    """``n`` bf16 values for (a part of) tensor ``name``: clamp bounds, scalars and norms near their real values."""
    import torch

    part = buf[:n]
    if name.endswith(("input_min", "output_min")):
        return part.fill_(-8.0)
    if name.endswith(("input_max", "output_max")):
        return part.fill_(8.0)
    if name.endswith(("layer_scalar", "norm.weight")):
        return part.fill_(1.0)
    return part.copy_(torch.empty(n, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))


def build_base(out: Path, seed: int = SEED, *, variant: str = VARIANT, shard_mb: int = SHARD_MB) -> dict[str, Any]:
    """Write the real-size checkpoint of ``variant`` into ``out`` tensor by tensor; return what was built."""
    import math

    import torch
    from real_vocab import pad_vocabulary

    from gemma4_tune.api import tiny_model
    from gemma4_tune.export.manifest import TensorInfo, checkpoint_names
    from gemma4_tune.export.merge import plan_shards

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="g4t-tiny-") as tmp:
        tiny = tiny_model(variant.removeprefix("gemma-4-"), Path(tmp) / "tiny")
        tiny_cfg = json.loads((tiny / "config.json").read_text())
        for src in tiny.iterdir():
            if src.suffix != ".safetensors" and src.name not in ("config.json", "gemma4_tune_tiny.json"):
                shutil.copy(src, out / src.name)
    pad_vocabulary(out / "tokenizer.json", VOCAB)
    config = real_config(variant)
    for part, tiny_part in ((config, tiny_cfg), (config["text_config"], tiny_cfg["text_config"])):
        for key, value in tiny_part.items():
            if key.endswith(("token_id", "token_ids", "token_index")):
                part[key] = value
    config["dtype"] = config["text_config"]["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    keys = key_set(variant, checkpoint_names(out))
    infos, offset = [], 0
    for name, (shape, dtype) in keys.items():
        nbytes = math.prod(shape) * (2 if dtype == "BF16" else 8)
        infos.append(TensorInfo(name, dtype, shape, out, offset, offset + nbytes))
        offset += nbytes
    shards = plan_shards(infos, shard_mb)
    gen = torch.Generator().manual_seed(seed)
    buf = torch.empty(CHUNK, dtype=torch.bfloat16)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard.name = name
        with open(out / name, "wb") as fh:
            fh.write(shard.header())
            for info in shard.tensors:
                if info.dtype != "BF16":
                    fh.write(torch.zeros(info.shape, dtype=torch.int64).numpy().tobytes())
                    continue
                left = info.nbytes // 2
                while left:
                    n = min(CHUNK, left)
                    fh.write(_fill(info.name, n, gen, buf).view(torch.uint8).numpy().tobytes())
                    left -= n
        print(f"  wrote {name} ({sum(t.nbytes for t in shard.tensors) / 1e9:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": offset},
             "weight_map": dict(sorted((t.name, s.name) for s in shards for t in s.tensors))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"bytes": offset, "tensors": len(keys), "seconds": round(time.perf_counter() - started, 1)}


def _is_kv_shared(config: dict[str, Any], key: str) -> bool:
    text = config["text_config"]
    first_shared = text["num_hidden_layers"] - text.get("num_kv_shared_layers", 0)
    layer = int(key.split(".layers.")[1].split(".")[0]) if ".language_model.layers." in key else -1
    return layer >= first_shared and key.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight"))


def build_adapter(base: Path, out: Path, seed: int = SEED) -> dict[str, Any]:
    """Rank-16 text + vision LoRA made with prepare_model on the meta model, random factors, saved as PEFT does."""
    import torch
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    cfg = Gemma4Config.from_pretrained(str(base))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(cfg)
    model, plan = prepare_model(model, TARGETS, LoraSettings(rank=RANK))
    gen = torch.Generator().manual_seed(seed + 1)
    n = 0
    for name, param in list(model.named_parameters()):
        if not param.requires_grad:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        value = torch.randn(param.shape, generator=gen) * 0.02
        setattr(owner, name.rsplit(".", 1)[1], torch.nn.Parameter(value.to(torch.bfloat16)))
        n += 1
    save_adapter(model, out, plan=plan)
    return {"lora_tensors": n}


# ---------------------------------------------------------------------------------------------- measuring


def evict(paths: list[Path]) -> None:
    """Sync, then drop these files' pages from the page cache (a cold read for the next side)."""
    os.sync()
    for root in paths:
        for path in (root.rglob("*") if root.is_dir() else [root]):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def measured(cmd: list[str], inputs: list[Path], what: str) -> dict[str, Any]:
    """Run ``cmd`` then ``sync`` in a fresh process tree on a cold cache; wall time, peak RSS."""
    evict(inputs)
    script = " ".join(f"'{c}'" for c in cmd) + " && sync"
    proc = subprocess.run([sys.executable, "-c", common.MEASURE_CHILDREN, "sh", "-c", script], capture_output=True,
                          text=True)
    result = json.loads(proc.stdout)
    if result["rc"]:
        raise RuntimeError(f"{what} failed (exit {result['rc']}):\n{result['stderr']}")
    return {"seconds": round(result["seconds"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "stdout_tail": result["stdout"][-600:]}


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compare(base: Path, adapter: Path, merged: Path, peft: Path | None) -> dict[str, Any]:
    """Copied tensors byte for byte; sampled merged tensors against the fp32 reference and PEFT's merge."""
    import random

    from safetensors import safe_open

    from gemma4_tune.export.manifest import read_checkpoint, resolve_adapter

    layout = resolve_adapter(adapter, base)
    base_info, merged_info = read_checkpoint(base), read_checkpoint(merged)
    copied_equal = copied = 0
    for name, info in base_info.items():
        if name in layout.deltas:
            continue
        copied += 1
        other = merged_info[name]
        with open(info.file, "rb") as a, open(other.file, "rb") as b:
            a.seek(info.start)
            b.seek(other.start)
            left, same = info.nbytes, True
            while left and same:
                n = min(64 << 20, left)
                same = a.read(n) == b.read(n)
                left -= n
        copied_equal += same
    names = sorted(layout.deltas)
    sample = random.Random(SEED).sample(names, min(SAMPLED_MERGED, len(names)))
    peft_info = read_checkpoint(peft) if peft is not None else {}
    adapter_file = safe_open(str(layout.weights), "pt")
    worst_ref = worst_peft = 0.0
    differ_peft = 0
    for name in sample:
        with safe_open(str(base_info[name].file), "pt") as fb, safe_open(str(merged_info[name].file), "pt") as fm:
            w, ours = fb.get_tensor(name), fm.get_tensor(name)
        ref = w.float()
        for d in layout.deltas[name]:
            b, a = adapter_file.get_tensor(d.lora_b).float(), adapter_file.get_tensor(d.lora_a).float()
            ref += (b @ a) * d.scaling
        worst_ref = max(worst_ref, (ref.to(w.dtype).float() - ours.float()).abs().max().item())
        if name in peft_info:
            with safe_open(str(peft_info[name].file), "pt") as fp:
                theirs = fp.get_tensor(name)
            worst_peft = max(worst_peft, (theirs.float() - ours.float()).abs().max().item())
            differ_peft += int((theirs != ours).sum())
    return {"copied_tensors": copied, "copied_byte_identical": copied_equal,
            "merged_tensors": len(names), "merged_sampled": len(sample),
            "max_abs_diff_vs_fp32_reference_rounded_once": worst_ref,
            "max_abs_diff_vs_peft_bf16_merge": worst_peft if peft is not None else None,
            "elements_differing_from_peft_bf16_merge": differ_peft if peft is not None else None,
            "keys_peft_save_pretrained_dropped": sorted(set(base_info) - set(peft_info))[:8] if peft else None,
            "n_keys_peft_save_pretrained_dropped": len(set(base_info) - set(peft_info)) if peft else None}


def describe(base: Path, adapter: Path) -> dict[str, Any]:
    """What the checkpoint and the adapter hold, read from their files (built now or reused)."""
    from gemma4_tune.export.manifest import read_checkpoint, resolve_adapter

    config = json.loads((base / "config.json").read_text())
    keys = read_checkpoint(base)
    deltas = resolve_adapter(adapter, base).deltas
    return {"base": {"tensors": len(keys), "bytes": sum(t.nbytes for t in keys.values()),
                     "shards": len({t.file for t in keys.values()}), "dtypes": sorted({t.dtype for t in keys.values()}),
                     "kv_shared_keys": sum(1 for k in keys if _is_kv_shared(config, k)),
                     "clamp_buffers": sum(1 for k in keys if k.endswith(("input_min", "input_max", "output_min",
                                                                          "output_max"))),
                     "config": f"{VARIANT} (catalog), vocab {config['text_config']['vocab_size']}"},
            "adapter": {"modules": len(deltas), "rank": RANK, "targets": TARGETS,
                        "bytes": sum(p.stat().st_size for p in adapter.glob("*.safetensors"))}}


def run(work: Path, sides: tuple[str, ...]) -> dict[str, Any]:
    """Build or reuse the checkpoint under ``work``, run the sides; the result payload."""
    base, adapter = work / "base", work / "adapter"
    payload: dict[str, Any] = {}
    if not (base / "model.safetensors.index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        print("building the E2B-sized checkpoint ...", flush=True)
        payload["built"] = build_base(base)
    if not (adapter / "adapter_config.json").is_file():
        payload["built_adapter"] = build_adapter(base, adapter)
    payload.update(describe(base, adapter))
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"base {size / 1e9:.2f} GB; adapter ready", flush=True)
    results: dict[str, Any] = {}
    merged, peft_out, cp_out, gguf_out = work / "merged", work / "peft", work / "cp", work / "gguf"
    py = [sys.executable]
    cli = [*py, "-m", "gemma4_tune"]
    for side in sides:
        for path in {"cp": [cp_out], "merge": [merged], "peft": [peft_out], "gguf": [gguf_out]}[side]:
            shutil.rmtree(path, ignore_errors=True)
        if side == "cp":
            cp_out.mkdir()
            r = measured(["sh", "-c", f"cp {base}/*.safetensors {cp_out}/"], [base], "cp")
            out_bytes = dir_bytes(cp_out)
            shutil.rmtree(cp_out)
        elif side == "merge":
            r = measured([*cli, "export", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged),
                          "--shard-size-mb", str(SHARD_MB)], [base, adapter], "merge")
            out_bytes = dir_bytes(merged)
            r["record"] = json.loads((merged / "gemma4_tune_merge.json").read_text())["tensors_merged"]
        elif side == "peft":
            r = measured([*py, "-c", PEFT_MERGE, str(base), str(adapter), str(peft_out)], [base, adapter], "peft")
            out_bytes = dir_bytes(peft_out)
        else:
            r = measured([*py, "-c", GGUF, str(merged), str(gguf_out)], [merged], "gguf")
            out_bytes = dir_bytes(gguf_out)
            r["files"] = {p.name: p.stat().st_size for p in gguf_out.glob("*.gguf")}
            shutil.rmtree(gguf_out)
        r.update(bytes_out=out_bytes, mb_per_s=round(size / 1e6 / r["seconds"], 1),
                 peak_rss_vs_checkpoint=round(r["peak_rss_mb"] * 2**20 / size, 3))
        results[side] = r
        print(f"{side}: {r['seconds']} s, {r['mb_per_s']} MB/s of the checkpoint, peak RSS {r['peak_rss_mb']} MB "
              f"({r['peak_rss_vs_checkpoint']}x the checkpoint)", flush=True)
        if side == "peft" and merged.is_dir():
            payload["exactness"] = compare(base, adapter, merged, peft_out)
            shutil.rmtree(peft_out)
    if "exactness" not in payload and merged.is_dir():
        payload["exactness"] = compare(base, adapter, merged, None)
    payload.update(checkpoint_bytes=size, sides=results)
    ratios: dict[str, float] = {}
    goals: dict[str, Any] = {}
    if "merge" in results:
        ratios["merge_peak_rss_vs_checkpoint"] = results["merge"]["peak_rss_vs_checkpoint"]
        goals["merge_peak_rss"] = common.goal(ratios["merge_peak_rss_vs_checkpoint"], 0.15, at_least=False)
        if "cp" in results:
            ratios["merge_speed_vs_cp"] = round(results["cp"]["seconds"] / results["merge"]["seconds"], 3)
            goals["merge_speed"] = common.goal(ratios["merge_speed_vs_cp"], 0.5, at_least=True)
        if "peft" in results:
            ratios["merge_peak_rss_vs_peft"] = round(results["merge"]["peak_rss_mb"] / results["peft"]["peak_rss_mb"], 3)
            ratios["merge_speed_vs_peft"] = round(results["peft"]["seconds"] / results["merge"]["seconds"], 3)
    if "gguf" in results:
        ratios["gguf_peak_rss_vs_checkpoint"] = results["gguf"]["peak_rss_vs_checkpoint"]
        goals["gguf_peak_rss"] = common.goal(ratios["gguf_peak_rss_vs_checkpoint"], 0.3, at_least=False)
    payload.update(ratios=ratios, goals=goals)
    return payload


def needed_disk() -> int:
    """Bytes the run needs on the work directory's disk (from the key set, before building)."""
    import math

    keys = key_set()
    return int(DISK_FACTOR * sum(math.prod(shape) * 2 for shape, _ in keys.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work directory to build (or reuse) the checkpoint in and keep")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    a = parser.parse_args(argv)
    sides = tuple(s for s in a.sides.split(",") if s)
    if set(sides) - set(SIDES):
        parser.error(f"unknown sides {sorted(set(sides) - set(SIDES))}")
    work_parent = a.keep.parent if a.keep else Path(tempfile.gettempdir())
    work_parent.mkdir(parents=True, exist_ok=True)
    need, free = needed_disk(), shutil.disk_usage(work_parent).free
    reused = a.keep is not None and (a.keep / "base" / "model.safetensors.index.json").is_file()
    if not reused and free < need:
        print(f"skipped: the real-size export benchmark needs about {need / 1e9:.0f} GB free on {work_parent}, "
              f"{free / 1e9:.0f} GB are (pass --keep DIR on a larger disk)")
        return
    started = common.machine()
    if a.keep:
        payload = run(a.keep, sides)
    else:
        with tempfile.TemporaryDirectory(prefix="g4t-bench-export-", dir=work_parent) as tmp:
            payload = run(Path(tmp), sides)
    what = ("export at real size: `gemma4-tune export --merged` and the GGUF conversion of a 10 GB E2B-shaped "
            "checkpoint, against cp of its shards and PEFT merge_and_unload + save_pretrained")
    path = common.write_result("export_real_size", started, {"what": what, **payload})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
