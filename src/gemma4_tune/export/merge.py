"""Streaming LoRA merge: base checkpoint + PEFT adapter -> a full checkpoint stock tools load.

Memory stays bounded by one tensor, not one model (the mergekit lazy-loader idea): the output
shard layout is planned from the base's safetensors headers before any data is read, each output
shard's header is written first, and then its tensors are streamed in one at a time. Tensors
without LoRA are copied byte for byte in bounded chunks (clamp buffers, ``layer_scalar``, the
KV-shared-layer k/v/k_norm keys of official E2B/E4B checkpoints: rows 2, 7); tensors with LoRA
are read, merged in fp32 as ``W + scaling * delta`` with PEFT's own layout (3-D experts: row 17)
and written back in the base tensor's dtype. Keys keep the base's official layout (tower
``...q_proj.linear.weight`` is never renamed, row 2), so the merged key set equals the base's.

Everything is written into a temporary sibling directory that replaces ``out_dir`` only when
complete (a crash leaves no half checkpoint). An Ollama ``Modelfile`` (``FROM .``) goes beside the
weights: Ollama no longer takes LoRA adapters (row 22).
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gemma4_tune.export.manifest import (
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_NAME,
    LoraDelta,
    TensorInfo,
    checked_adapter,
    read_checkpoint,
    tensors_in_file,
)
from gemma4_tune.findings import OUTPUT_EXISTS, FindingError, Severity, finding, register
from gemma4_tune.io import atomic_directory, check_free_space, json_text, output_errors

MERGED_NOT_FINITE = register("G4T806", Severity.ERROR, "Merged weights are not finite", (19,))

MERGE_RECORD = "gemma4_tune_merge.json"
MODELFILE = "Modelfile"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_COPY_CHUNK = 64 * 1024 * 1024
_MB = 1000 * 1000  # "MB" as transformers' max_shard_size counts it
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEXES = (".index.json",)
_NOT_COPIED = {MODELFILE, MERGE_RECORD, MANIFEST_NAME}

MODELFILE_TEXT = """\
# Ollama Modelfile for this merged Gemma 4 checkpoint (written by gemma4-tune).
# Ollama no longer takes LoRA adapters: the ADAPTER instruction was removed in v0.34.1
# (ollama/ollama#15307), so this points at the merged weights in this directory.
#   ollama create my-gemma4 -f Modelfile
# No TEMPLATE on purpose: the chat template ships with the checkpoint; add one only if
# `ollama show --modelfile my-gemma4` renders turns differently from `<|turn>user ... <turn|>`.
FROM .
PARAMETER stop "<turn|>"
"""


@dataclass
class MergeResult:
    """What a merge wrote and what it cost."""

    out_dir: Path
    tensors_merged: int  # base tensors changed by LoRA
    tensors_copied: int  # base tensors copied byte for byte
    bytes_written: int  # weight shards + index
    seconds: float
    peak_rss_mb: float  # the whole process's peak resident set (getrusage), not only the merge
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------- reading and writing bytes


def _read_bytes(fh: BinaryIO, start: int, length: int) -> bytearray:
    buf = bytearray(length)
    fh.seek(start)
    if fh.readinto(buf) != length:
        raise OSError(f"{getattr(fh, 'name', 'file')} ended early (wanted {length} bytes at {start})")
    return buf


def _read_tensor(fh: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor, read from its byte range (no mmap: resident memory stays one tensor)."""
    return torch.frombuffer(_read_bytes(fh, info.start, info.nbytes), dtype=_TORCH_DTYPES[info.dtype]).reshape(
        info.shape)


def _write_tensor_bytes(fh: BinaryIO, data: Any) -> int:
    """The one place tensor data is written (a test makes it fail to prove a crash leaves nothing)."""
    fh.write(data)
    return len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes


def _copy_tensor(src: BinaryIO, dst: BinaryIO, info: TensorInfo) -> int:
    """Copy a tensor's bytes unchanged, in bounded chunks."""
    written, pos = 0, info.start
    while pos < info.end:
        n = min(_COPY_CHUNK, info.end - pos)
        written += _write_tensor_bytes(dst, _read_bytes(src, pos, n))
        pos += n
    return written


def lora_delta(delta: LoraDelta, a: torch.Tensor, b: torch.Tensor,
               compute: torch.dtype = torch.float32) -> torch.Tensor:
    """``scaling * B @ A`` in ``compute`` precision, shaped like the base tensor, in PEFT's layout.

    Linear: ``lora_A [r, in]``, ``lora_B [out, r]`` -> ``[out, in]`` (``Linear.get_delta_weight``).
    Experts (``ParamWrapper.get_delta_weight``): ``lora_A [experts*r, in]`` is expert-major (rows
    ``e*r .. e*r+r-1`` belong to expert ``e``) while ``lora_B [out, r*experts]`` is rank-major
    (column ``k*experts + e``); ``delta[e] = B_e @ A_e`` (row 17).
    """
    a, b = a.to(compute), b.to(compute)
    if delta.kind == "linear":
        return (b @ a) * delta.scaling
    n = delta.num_experts
    if n == 1:
        d = (b @ a) * delta.scaling
        return (d.T if delta.transposed else d).unsqueeze(0)
    weight_a = a.reshape(n, -1, a.shape[-1])  # experts x rank x in
    weight_b = b.reshape(b.shape[0], -1, n)  # out x rank x experts
    layout = "o r e, e r i -> e i o" if delta.transposed else "o r e, e r i -> e o i"
    return torch.einsum(layout, weight_b, weight_a) * delta.scaling


def add_lora_(weight: torch.Tensor, delta: LoraDelta, a: torch.Tensor, b: torch.Tensor) -> None:
    """``weight += lora_delta(...)`` in place; experts one at a time, so a 3-D expert stack never needs
    a second full-size fp32 copy (the 26B-A4B gate_up_proj is 1 GB in bf16, 2 GB in fp32)."""
    if delta.kind == "linear" or delta.num_experts == 1:
        weight += lora_delta(delta, a, b, weight.dtype).reshape(weight.shape)
        return
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    n = delta.num_experts
    weight_a = a.reshape(n, -1, a.shape[-1])  # experts x rank x in
    weight_b = b.reshape(b.shape[0], -1, n)  # out x rank x experts
    for e in range(n):
        d = weight_b[:, :, e] @ weight_a[e]  # out x in
        weight[e] += (d.T if delta.transposed else d) * delta.scaling


# --------------------------------------------------------------------------- planning


@dataclass
class _Shard:
    name: str
    tensors: list[TensorInfo]

    def header(self) -> bytes:
        """safetensors header for these tensors in this order, padded to 8 bytes."""
        head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in self.tensors:
            head[info.name] = {"dtype": info.dtype, "shape": list(info.shape),
                               "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        blob = json.dumps(head, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob


def plan_shards(tensors: list[TensorInfo], shard_size_mb: int) -> list[_Shard]:
    """Greedy shards of at most ``shard_size_mb`` of tensor data in base order (a larger tensor gets
    its own shard); inside a shard, wider dtypes first so every tensor stays aligned."""
    if shard_size_mb < 1:
        raise ValueError("shard_size_mb must be at least 1")
    limit = shard_size_mb * _MB
    groups: list[list[TensorInfo]] = []
    current: list[TensorInfo] = []
    size = 0
    for info in tensors:
        if current and size + info.nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(info)
        size += info.nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        order = {info.name: j for j, info in enumerate(group)}
        group = sorted(group, key=lambda t: (-t.itemsize, order[t.name]))
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(_Shard(name, group))
    return shards


def merged_size(base_dir: str | Path) -> int:
    """Bytes a merged checkpoint of ``base_dir`` takes: its tensors (headers and the small files are in the margin)."""
    return sum(info.nbytes for info in read_checkpoint(Path(base_dir)).values())


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEXES)


def _copy_other_files(base_dir: Path, out: Path) -> None:
    """Config, generation config, tokenizer, processor, chat template, README: all but weights."""
    for src in sorted(base_dir.iterdir()):
        if src.name.startswith(".") or src.name in _NOT_COPIED:
            continue
        if src.is_dir():
            shutil.copytree(src, out / src.name, ignore=lambda d, names: [
                n for n in names if n.startswith(".") or _is_weight_file(Path(d) / n)])
        elif src.is_file() and not _is_weight_file(src):
            shutil.copyfile(src, out / src.name)


# --------------------------------------------------------------------------- merge


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, shard_size_mb: int = 2000,
                  progress: bool = True, overwrite: bool = False) -> MergeResult:
    """Merge a PEFT LoRA adapter into ``base_dir`` and write a full checkpoint to ``out_dir``.

    Output shards hold at most ``shard_size_mb`` MB (10**6 bytes, as transformers counts) of tensor
    data, or one larger tensor; one shard is written as ``model.safetensors``, several get a
    ``model.safetensors.index.json``. ``progress`` shows a byte progress bar on stderr.

    Refuses (FindingError) an adapter trained on another base (G4T801), one that does not fit
    this base (G4T802), uses LoRA features not implemented here such as DoRA (G4T803), or is
    incomplete (G4T805); a merge that produces inf/NaN (G4T806) leaves nothing behind.
    """
    started = time.perf_counter()
    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    for src in (base_dir, adapter_dir):
        if out.resolve() == src.resolve():
            raise FindingError(finding(OUTPUT_EXISTS.code, f"--out {out} is the input directory {src}",
                                       "write the merged checkpoint to a new directory"))
    checked = checked_adapter(adapter_dir, base_dir)
    layout, base = checked.layout, checked.base_tensors
    shards = plan_shards(list(base.values()), shard_size_mb)
    adapter_index = {t.name: t for t in tensors_in_file(layout.weights)} if layout.weights else {}
    total = sum(info.nbytes for info in base.values())
    check_free_space([(out, total, "the merged checkpoint")])
    merged = copied = written = 0

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from gemma4_tune.console import err_console

    handles: dict[Path, BinaryIO] = {}

    def handle(path: Path) -> BinaryIO:
        if path not in handles:
            handles[path] = open(path, "rb")  # noqa: SIM115 - closed in finally
        return handles[path]

    bar = Progress(TextColumn("merge {task.fields[shard]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=not progress)
    try:
        with output_errors(out, "the merged checkpoint"), atomic_directory(out, overwrite=overwrite) as tmp, bar:
            task = bar.add_task("merge", total=total, shard="")
            for shard in shards:
                bar.update(task, shard=shard.name)
                with open(tmp / shard.name, "wb") as dst:
                    header = shard.header()
                    dst.write(header)
                    written += len(header)
                    for info in shard.tensors:
                        deltas = layout.deltas.get(info.name)
                        if deltas:
                            n = _write_merged(dst, handle(info.file), handle(layout.weights), adapter_index,
                                              info, deltas)
                            merged += 1
                        else:
                            n = _copy_tensor(handle(info.file), dst, info)
                            copied += 1
                        if n != info.nbytes:
                            raise OSError(f"wrote {n} bytes for {info.name}, expected {info.nbytes}")
                        written += n
                        bar.advance(task, info.nbytes)
            if len(shards) > 1:
                index = {"metadata": {"total_size": total},
                         "weight_map": {info.name: s.name for s in shards for info in s.tensors}}
                index["weight_map"] = dict(sorted(index["weight_map"].items()))
                data = (json_text(index) + "\n").encode()
                (tmp / INDEX_NAME).write_bytes(data)
                written += len(data)
            _copy_other_files(base_dir, tmp)
            (tmp / MODELFILE).write_text(MODELFILE_TEXT)
            record = {
                "kind": "gemma4_tune.merge", "schema": 1,
                "base": {"path": str(base_dir.resolve()), "fingerprint": checked.fingerprint},
                "adapter": {"path": str(adapter_dir.resolve()), "r": layout.config.get("r"),
                            "lora_alpha": layout.config.get("lora_alpha"),
                            "use_rslora": bool(layout.config.get("use_rslora")),
                            "training": (checked.manifest or {}).get("training")},
                "tensors_merged": merged, "tensors_copied": copied,
                "shards": [s.name for s in shards],
                "files": sorted([p.name for p in tmp.iterdir()] + [MERGE_RECORD]),  # what the merge wrote
            }
            (tmp / MERGE_RECORD).write_text(json_text(record) + "\n")
    finally:
        for fh in handles.values():
            fh.close()
    return MergeResult(out, merged, copied, written, time.perf_counter() - started, peak_rss_mb(),
                       [s.name for s in shards])


def _write_merged(dst: BinaryIO, src: BinaryIO, adapter: BinaryIO, adapter_index: dict[str, TensorInfo],
                  info: TensorInfo, deltas: list[LoraDelta]) -> int:
    """Read one base tensor, add its LoRA deltas in fp32 (fp64 for fp64 bases), write it back in the base dtype."""
    compute = torch.float64 if info.dtype == "F64" else torch.float32
    weight = _read_tensor(src, info).to(compute)
    for delta in deltas:
        a = _read_tensor(adapter, adapter_index[delta.lora_a])
        b = _read_tensor(adapter, adapter_index[delta.lora_b])
        add_lora_(weight, delta, a, b)
    out = weight.to(_TORCH_DTYPES[info.dtype]).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise FindingError(finding(MERGED_NOT_FINITE.code, f"merging the adapter into {info.name} "
                                   f"({info.dtype}) gives inf/NaN values",
                                   "the adapter is broken (NaN weights) or the values overflow this dtype; check "
                                   "the training loss and merge into a bf16/fp32 base"))
    return _write_tensor_bytes(dst, out.reshape(-1).view(torch.uint8).numpy())


__all__ = ["ADAPTER_WEIGHTS", "MERGED_NOT_FINITE", "MergeResult", "add_lora_", "lora_delta", "merge_adapter",
           "plan_shards"]
