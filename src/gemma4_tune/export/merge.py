"""Streaming LoRA merge: base checkpoint + PEFT adapter -> a full checkpoint stock tools load.

Memory stays bounded by one tensor, not one model (the mergekit lazy-loader idea): the output
shard layout is planned from the base's safetensors headers before any data is read, each output
shard's header is written first, and then its tensors are streamed in one at a time. Tensors
without LoRA are copied byte for byte inside the kernel (``copy_file_range``; clamp buffers,
``layer_scalar``, the KV-shared-layer k/v/k_norm keys of official E2B/E4B checkpoints: rows 2, 7);
tensors with LoRA are read into reused buffers, merged in fp32 as ``W + scaling * delta`` with PEFT's
own operations and layout (3-D experts: row 17), rounded once to the base tensor's dtype, checked
finite through their sum, and written back. Keys keep the base's official layout (tower
``...q_proj.linear.weight`` is never renamed, row 2), so the merged key set equals the base's.

Everything is written into a temporary sibling directory that replaces ``out_dir`` only when
complete (a crash leaves no half checkpoint). An Ollama ``Modelfile`` (``FROM .``) goes beside the
weights: Ollama no longer takes LoRA adapters (row 22).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gemma4_tune.export.manifest import (
    ADAPTER_DOES_NOT_FIT,
    ADAPTER_WEIGHTS,
    INDEX_NAME,
    MANIFEST_NAME,
    SINGLE_NAME,
    UNSUPPORTED_ADAPTER,
    LoraDelta,
    TensorInfo,
    checked_adapter,
    checkpoint_names,
    manifest_quantization,
    read_checkpoint,
    tensors_in_file,
)
from gemma4_tune.findings import OUTPUT_EXISTS, Finding, FindingError, Severity, finding, register
from gemma4_tune.io import atomic_directory, check_free_space, json_text, output_errors
from gemma4_tune.model.quantization import QuantSpec, dequantized

MERGED_NOT_FINITE = register("G4T806", Severity.ERROR, "Merged weights are not finite", (19,))
MERGED_INTO_ORIGINAL = register("G4T814", Severity.WARNING, "A QLoRA adapter was merged into the original weights",
                                (38,))

MERGE_RECORD = "gemma4_tune_merge.json"
MODELFILE = "Modelfile"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_COPY_CHUNK = 64 * 1024 * 1024
_BLOCK = 128 * 1024  # elements per element-wise pass of a merge: the fp32 block and its product stay in cache
#: errors that mean "no kernel copy between these two files" (another filesystem, an old kernel): fall back
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY}
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
    copied_by: list[str] = field(default_factory=list)  # how unchanged tensors were copied (_Copier's ways)
    weights: str = "original"  # what the deltas were added to: the base's own or its dequantized 4-bit weights
    tensors_dequantized: int = 0  # weights replaced by their dequantized 4-bit values (QLoRA)

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


def _read_into(fh: BinaryIO, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the uint8 tensor ``out`` with the file's bytes at ``start`` (no zero-filled buffer, no mmap)."""
    view, done, fd = memoryview(out.numpy()), 0, fh.fileno()
    while done < len(view):
        n = os.preadv(fd, [view[done:]], start + done)
        if n == 0:
            raise OSError(f"{getattr(fh, 'name', 'file')} ended early (wanted {len(view)} bytes at {start})")
        done += n
    return out


def _read_tensor(fh: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One (small) tensor, read from its byte range: the adapter's factors."""
    raw = _read_into(fh, info.start, torch.empty(info.nbytes, dtype=torch.uint8))
    return raw.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)


def _write_tensor_bytes(fh: BinaryIO, data: Any, offset: int) -> int:
    """The one place tensor data is written from memory, at ``offset`` of ``fh`` (a test makes it fail to
    prove a crash leaves nothing). A write can be short (Linux writes at most 2 GiB per call): loop."""
    view, done, fd = memoryview(data).cast("B"), 0, fh.fileno()
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


class _Copier:
    """Copies unchanged tensors' byte ranges from a base shard to the output inside the kernel.

    ``copy_file_range`` (an in-kernel copy, a reflink where the filesystem has them), else ``sendfile``;
    where neither works between the two files (another filesystem, an old kernel) through a bounded
    buffer. Either way the bytes are the source's, unchanged; ``used`` says which ways were taken.
    """

    _WAYS = ("copy_file_range", "sendfile", "buffered")

    def __init__(self) -> None:
        self.way = 0
        self.used: set[str] = set()

    def copy(self, src: BinaryIO, dst: BinaryIO, start: int, length: int, offset: int) -> int:
        """Copy ``length`` bytes of ``src`` at ``start`` to ``dst`` at ``offset``; returns bytes written."""
        done = 0
        while done < length and self.way < 2:
            try:
                if self.way == 0:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, start + done, offset + done)
                else:  # sendfile writes at the file position: only this thread moves it
                    os.lseek(dst.fileno(), offset + done, os.SEEK_SET)
                    n = os.sendfile(dst.fileno(), src.fileno(), start + done, length - done)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY or done:
                    raise
                self.way += 1
                continue
            if n == 0:
                raise OSError(f"{getattr(src, 'name', 'file')} ended early (wanted {length} bytes at {start})")
            done += n
        if done < length:
            buf = torch.empty(min(_COPY_CHUNK, length - done), dtype=torch.uint8)
            while done < length:
                chunk = _read_into(src, start + done, buf[:min(_COPY_CHUNK, length - done)])
                done += _write_tensor_bytes(dst, chunk.numpy(), offset + done)
        self.used.add(self._WAYS[self.way])
        return done


class _ShardWriter:
    """Writes one output shard from a background thread while the caller computes merged tensors.

    Tasks run in order in one thread: kernel copies of unchanged tensors (``copy``) and writes of
    merged ones (``write``), each at its offset. A merged tensor is rounded into one of two byte
    buffers, which the writer owns until its bytes are written (``buffer`` waits for that), so the
    computation runs at most two tensors ahead of the disk. After the first error the remaining
    tasks are skipped; ``close`` waits for all and raises it, ``abort`` waits without raising.
    """

    def __init__(self, dst: BinaryIO, memory: _WorkMemory, copier: _Copier, advance: Callable[[int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._dst, self._memory, self._copier, self._advance = dst, memory, copier, advance
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write")
        self._tasks: list[Any] = []
        self._slots: dict[int, Any] = {}
        self._turn = 0
        self._error: BaseException | None = None

    def copy(self, src: BinaryIO, info: TensorInfo, offset: int) -> None:
        """Copy an unchanged tensor's bytes to ``offset``, in the background."""
        self._submit(self._copy, src, info, offset)

    def buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next free byte buffer of ``nbytes`` (waits for the write that held it)."""
        slot, self._turn = self._turn, 1 - self._turn
        held = self._slots.pop(slot, None)
        if held is not None:
            held.result()
        self._raise()
        return slot, self._memory.get(f"bytes{slot}", nbytes, torch.uint8)

    def write(self, slot: int, data: torch.Tensor, offset: int, name: str) -> None:
        """Write ``data`` (buffer ``slot``) at ``offset``, in the background."""
        self._slots[slot] = self._submit(self._write, data, offset, name)

    def close(self) -> None:
        """Wait for every task; raise the first error."""
        self.abort()
        self._raise()

    def abort(self) -> None:
        """Wait for the tasks already queued (files must not close under them); raise nothing."""
        from concurrent.futures import wait

        wait(self._tasks)
        self._pool.shutdown(wait=True)

    def _copy(self, src: BinaryIO, info: TensorInfo, offset: int) -> None:
        n = self._copier.copy(src, self._dst, info.start, info.nbytes, offset)
        if n != info.nbytes:
            raise OSError(f"wrote {n} bytes for {info.name}, expected {info.nbytes}")
        self._advance(n)

    def _write(self, data: torch.Tensor, offset: int, name: str) -> None:
        n = _write_tensor_bytes(self._dst, data.numpy(), offset)
        if n != data.numel():
            raise OSError(f"wrote {n} bytes for {name}, expected {data.numel()}")
        self._advance(n)

    def _submit(self, fn: Callable[..., None], *args: Any) -> Any:
        self._raise()

        def run() -> None:
            if self._error is not None:
                return
            try:
                fn(*args)
            except BaseException as exc:
                self._error = exc
                raise

        task = self._pool.submit(run)
        self._tasks.append(task)
        return task

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _WorkMemory:
    """Buffers reused from tensor to tensor: the bytes read (later the rounded result) and the fp32/fp64
    sums. Reuse is what makes the merge fast: a fresh multi-MB tensor costs a page fault per 4 KB."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def get(self, what: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements of ``dtype`` (contents undefined)."""
        nbytes = numel * dtype.itemsize
        held = self._held.get(what)
        if held is None or held.numel() < nbytes:
            held = self._held[what] = torch.empty(nbytes, dtype=torch.uint8)
        return held[:nbytes].view(dtype)


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
    """``weight += lora_delta(...)`` in place with PEFT's operations in PEFT's order (``B @ A``, times the
    scaling, added); experts one at a time, so a 3-D expert stack never needs a second full-size fp32
    copy (the 26B-A4B gate_up_proj is 1 GB in bf16, 2 GB in fp32)."""
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
                  progress: bool = True, overwrite: bool = False, into: str | None = None) -> MergeResult:
    """Merge a PEFT LoRA adapter into ``base_dir`` and write a full checkpoint to ``out_dir``.

    A QLoRA adapter (its manifest records a 4-bit base) is merged ``into`` the ``"dequantized"`` weights by
    default: every weight bitsandbytes held in 4 bits in training is quantized and dequantized exactly as then
    (LoRA or not), so the checkpoint is the model that was trained (row 38). ``"original"`` merges into the
    base's own weights, another model (verify measures how far). Without a 4-bit record only ``"original"`` is.

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
    quant, into = merge_weights(adapter_dir, into)
    requantized = quantized_tensors(base_dir, quant, base) if into == "dequantized" else set()
    shards = plan_shards(list(base.values()), shard_size_mb)
    adapter_index = {t.name: t for t in tensors_in_file(layout.weights)} if layout.weights else {}
    total = sum(info.nbytes for info in base.values())
    check_free_space([(out, total, "the merged checkpoint")])
    merged = copied = written = 0
    memory, copier = _WorkMemory(), _Copier()

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from gemma4_tune.console import err_console

    handles: dict[tuple[Path, str], BinaryIO] = {}

    def handle(path: Path, use: str) -> BinaryIO:
        """One handle per file and use ("copy", "merge"): the kernel keeps readahead per handle, and the
        two streams read different parts of a shard."""
        if (path, use) not in handles:
            handles[path, use] = open(path, "rb")  # noqa: SIM115 - closed in finally
        return handles[path, use]

    bar = Progress(TextColumn("merge {task.fields[shard]}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=err_console, transient=True, disable=not progress)
    try:
        with output_errors(out, "the merged checkpoint"), atomic_directory(out, overwrite=overwrite) as tmp, bar:
            task = bar.add_task("merge", total=total, shard="")
            for shard in shards:
                bar.update(task, shard=shard.name)
                counts = _write_shard(tmp / shard.name, shard, layout.deltas, handle, layout.weights, adapter_index,
                                      memory, copier, lambda n: bar.advance(task, n),
                                      (requantized, quant) if requantized else None)
                merged, copied, written = merged + counts[0], copied + counts[1], written + counts[2]
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
                "weights": into, "quantization": quant.to_dict() if quant else None,
                "tensors_merged": merged, "tensors_copied": copied, "tensors_dequantized": len(requantized),
                "shards": [s.name for s in shards],
                "files": sorted([p.name for p in tmp.iterdir()] + [MERGE_RECORD]),  # what the merge wrote
            }
            (tmp / MERGE_RECORD).write_text(json_text(record) + "\n")
    finally:
        for fh in handles.values():
            fh.close()
    return MergeResult(out, merged, copied, written, time.perf_counter() - started, peak_rss_mb(),
                       [s.name for s in shards], sorted(copier.used), into, len(requantized))


def merge_findings(adapter_dir: str | Path, result: MergeResult) -> list[Finding]:
    """G4T814 when a QLoRA adapter was merged into the base's original weights, as asked: another model."""
    quant = manifest_quantization(adapter_dir)
    if quant is None or result.weights != "original":
        return []
    return [finding(MERGED_INTO_ORIGINAL.code, f"{result.out_dir} holds the adapter merged into the original "
                    f"weights, but it was trained on the base in {quant.describe()}: every 4-bit layer now computes "
                    "with other weights than in training, so this is another model than the one you trained "
                    "(`gemma4-tune verify --merged` measures how far and fails it, G4T619)",
                    "leave --merge-into out to merge into the dequantized 4-bit weights (the model you trained)")]


def merge_weights(adapter_dir: str | Path, into: str | None) -> tuple[QuantSpec | None, str]:
    """The adapter's 4-bit record and the weights to merge into (``into`` resolved: ``dequantized`` for a QLoRA
    adapter, ``original`` otherwise); asking for the dequantized weights of a full-precision run is G4T803."""
    quant = manifest_quantization(adapter_dir)
    if into not in (None, "dequantized", "original"):
        raise ValueError(f"into={into!r}: use 'dequantized' or 'original'")
    if into == "dequantized" and quant is None:
        raise FindingError(finding(UNSUPPORTED_ADAPTER.code, f"--merge-into dequantized: {adapter_dir} was not "
                                   "trained on a 4-bit base (its manifest records no quantization), so there are no "
                                   "4-bit weights to merge into", "leave --merge-into out (or use original)"))
    return quant, into or ("dequantized" if quant else "original")


def quantized_tensors(base_dir: str | Path, quant: QuantSpec | None, base: dict[str, TensorInfo]) -> set[str]:
    """The checkpoint names of the weights training held in 4 bits (the manifest's modules and MoE expert stacks,
    under the names the checkpoint stores them by); one the base does not have means another base or a broken
    record (G4T802)."""
    if quant is None:
        return set()
    rename = checkpoint_names(Path(base_dir))
    names = {rename(f"{module}.weight") for module in quant.modules} | {rename(param) for param in quant.experts}
    missing = sorted(names - base.keys())
    if missing or not names:
        raise FindingError(finding(ADAPTER_DOES_NOT_FIT.code, f"the adapter's manifest says {len(quant.modules)} "
                                   f"modules were held in 4 bits, but the base has no {missing[:3]}" if missing else
                                   "the adapter's manifest records a 4-bit base but no module that was quantized",
                                   "merge with the base the adapter was trained on, or re-train it"))
    return names


def _write_shard(path: Path, shard: _Shard, deltas: dict[str, list[LoraDelta]],
                 handle: Callable[[Path, str], BinaryIO],
                 adapter_file: Path | None, adapter_index: dict[str, TensorInfo], memory: _WorkMemory,
                 copier: _Copier, advance: Callable[[int], None],
                 requantize: tuple[set[str], QuantSpec] | None = None) -> tuple[int, int, int]:
    """Write one output shard: its header, then each tensor, copied in the kernel or merged. Merged
    tensors are computed here while a background thread writes and copies (:class:`_ShardWriter`) and
    the kernel reads the next merged tensor ahead. ``requantize``: the tensors that are merged into their
    dequantized 4-bit values, with or without LoRA (QLoRA), and how. Returns ``(merged, copied, bytes)``."""
    merged = copied = 0
    names, quant = requantize or (set(), None)
    with open(path, "wb", buffering=0) as dst:
        writer = _ShardWriter(dst, memory, copier, advance)
        try:
            offset = _write_tensor_bytes(dst, shard.header(), 0)
            upcoming = [t for t in shard.tensors if t.name in deltas or t.name in names]
            if upcoming:
                _prefetch(handle(upcoming[0].file, "merge"), upcoming[0])
            for info in shard.tensors:
                if info.name in deltas or info.name in names:
                    upcoming.pop(0)
                    if upcoming:
                        _prefetch(handle(upcoming[0].file, "merge"), upcoming[0])
                    slot, raw = writer.buffer(info.nbytes)
                    data = _merged_bytes(handle(info.file, "merge"), adapter_file and handle(adapter_file, "merge"),
                                         adapter_index, info, deltas.get(info.name, []), memory, raw,
                                         quant if info.name in names else None)
                    writer.write(slot, data, offset, info.name)
                    merged += 1
                else:
                    writer.copy(handle(info.file, "copy"), info, offset)
                    copied += 1
                offset += info.nbytes
        except BaseException:
            writer.abort()
            raise
        writer.close()
        size = os.fstat(dst.fileno()).st_size
        if size != offset:
            raise OSError(f"{path.name} holds {size} bytes, expected {offset}")
    return merged, copied, offset


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, exactly, at the cost of a sum: a NaN or an inf anywhere makes
    the sum NaN or inf (it can never become finite again); only a sum that is not finite, which large
    finite values can also give, is settled element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_torch_thread()
def _merged_bytes(src: BinaryIO, adapter: BinaryIO | None, adapter_index: dict[str, TensorInfo], info: TensorInfo,
                  deltas: list[LoraDelta], memory: _WorkMemory, raw: torch.Tensor,
                  quant: QuantSpec | None = None) -> torch.Tensor:
    """One base tensor read into ``raw`` (uint8, its size), its LoRA deltas added in fp32 (fp64 for fp64
    bases), rounded once back into ``raw`` in the base dtype and checked finite; returns ``raw``. With
    ``quant`` the deltas are added to the tensor's dequantized 4-bit values (:func:`dequantized`, whole).

    Each ``B @ A`` is one full-size product, the very call PEFT makes; the element-wise rest (to fp32,
    times the scaling, added, rounded, summed for the finiteness check) runs block by block while the
    block is in cache, which gives the same values as whole-tensor passes at a third of the memory
    traffic. 3-D expert stacks go through :func:`add_lora_` whole. One torch thread: these passes are
    bound by memory, the other core serves the writes and the kernel copies, and a parallel region per
    cache-sized block costs more than it saves (12x slower beside a busy process, measured).
    """
    dtype = _TORCH_DTYPES[info.dtype]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    numel = info.nbytes // info.itemsize
    stored = _read_into(src, info.start, raw).view(dtype).view(info.shape)
    factors = [(d, _read_tensor(adapter, adapter_index[d.lora_a]).to(compute),
                _read_tensor(adapter, adapter_index[d.lora_b]).to(compute)) for d in deltas if adapter is not None]
    if quant is not None:  # the 4-bit weights training computed with, in the dtype they were quantized from
        weight = dequantized(stored, quant).to(compute)
        for d, a, b in factors:
            add_lora_(weight, d, a, b)
        stored.copy_(weight)
        finite = _all_finite(stored)
    elif any(d.kind != "linear" and d.num_experts > 1 for d in deltas):
        weight = stored if dtype == compute else memory.get("sum", numel, compute).view(info.shape).copy_(stored)
        for d, a, b in factors:
            add_lora_(weight, d, a, b)
        if weight is not stored:
            stored.copy_(weight)
        finite = _all_finite(stored)
    else:
        products = []
        for i, (d, a, b) in enumerate(factors):
            product = torch.mm(b, a, out=memory.get(f"product{i}", numel, compute).view(b.shape[0], a.shape[1]))
            if d.kind != "linear" and d.transposed:
                product = product.T.contiguous()
            products.append((product.reshape(-1), d.scaling))
        flat, finite = stored.view(-1), True
        sums = None if dtype == compute else memory.get("block", min(_BLOCK, numel), compute)
        for start in range(0, numel, _BLOCK):
            end = min(start + _BLOCK, numel)
            block = flat[start:end]
            weight = block if sums is None else sums[:end - start].copy_(block)
            for product, scaling in products:
                weight.add_(product[start:end].mul_(scaling))
            if weight is not block:
                block.copy_(weight)
            finite = _all_finite(block) and finite
    if not finite:
        raise FindingError(finding(MERGED_NOT_FINITE.code, f"merging the adapter into {info.name} "
                                   f"({info.dtype}) gives inf/NaN values",
                                   "the adapter is broken (NaN weights) or the values overflow this dtype; check "
                                   "the training loss and merge into a bf16/fp32 base"))
    return raw


def _prefetch(fh: BinaryIO, info: TensorInfo) -> None:
    """Ask the kernel to start reading a tensor that is needed next (reads overlap the current compute)."""
    if info.nbytes:
        os.posix_fadvise(fh.fileno(), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)


__all__ = ["ADAPTER_WEIGHTS", "MERGED_INTO_ORIGINAL", "MERGED_NOT_FINITE", "MergeResult", "add_lora_", "lora_delta",
           "merge_adapter", "merge_findings", "merge_weights", "plan_shards", "quantized_tensors"]
