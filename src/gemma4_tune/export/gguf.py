"""GGUF export with llama.cpp's own converters: merged text model, tower projector, text LoRA adapter.

``export_gguf`` turns a merged checkpoint (``export/merge.py``) into what llama.cpp and Ollama load:

- ``model-<T>.gguf``: the text model (``convert_hf_to_gguf.py``);
- ``mmproj-<T>.gguf``: the vision/audio towers (``convert_hf_to_gguf.py --mmproj``), only when the
  config has towers;
- ``base-<T>.gguf`` + ``adapter-<T>.gguf``: with ``adapter_dir`` and a local ``base_dir``, the
  base text model and the text LoRA adapter (``convert_lora_to_gguf.py``) for
  ``llama-server -m base-<T>.gguf --lora adapter-<T>.gguf``;
- ``Modelfile`` (``FROM ./model-<T>.gguf``: Ollama takes no adapters since v0.34.1, row 22) and a
  ``gemma4_tune_gguf.json`` record (files, tensor counts, seconds).

What is refused before any converter runs (the converters fail silently here):

- G4T912 (row 2): a checkpoint whose clipped tower linears were "unwrapped" (``...q_proj.weight``
  instead of ``...q_proj.linear.weight``, clamp buffers gone). The mmproj converter maps the
  renamed keys without error and writes a projector with a fraction of its tensors (81 of 217
  on the tiny E2B). The expected keys come from the model's own module types
  (``Gemma4ClippableLinear`` built on the meta device) and ``use_clipped_linears``.
- G4T914: an adapter with vision/audio tower LoRA. ``convert_lora_to_gguf.py`` drops those
  tensors without a word (140 -> 72 on the tiny E2B); the adapter GGUF is skipped with a warning,
  the merged GGUF carries the towers' fine-tune.
- G4T204 (row 22): MoE expert LoRA, which ``convert_lora_to_gguf.py`` cannot map; skipped likewise.
- G4T922 (row 38): a QLoRA adapter, which llama.cpp would apply to the full-precision base; skipped likewise.

After each conversion the GGUF header's tensor count must equal what the checkpoint holds
(G4T913): text keys + the generated ``rope_freqs``, every tower key, two tensors per text LoRA
module. A converter that fails raises G4T916 with its last lines. Everything is written into a
temporary sibling directory that replaces ``out_dir`` only when complete.

Memory: ``convert_hf_to_gguf.py`` converts each tensor whole, in anonymous memory, about 4x its bf16
bytes for a bf16 GGUF (a float32 copy, then the groups of converted rows and their concatenation):
the E2B's 4.7 GB per-layer embedding table took a 10.25 GB checkpoint to 19.1 GB. With a converter
release checked here (:data:`BOUNDED_CONVERTERS`), :func:`_bounded_convert` has its tensor loop write
every large tensor it passes through unchanged in row chunks of :data:`CHUNK_BYTES` (the converter's
own ``gguf.LazyChunkedTensor``), the same bytes. :func:`conversion_memory` estimates the peak from the
safetensors headers; G4T919 refuses, before any converter starts, what this machine cannot hold.
"""

from __future__ import annotations

import collections
import inspect
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemma4_tune.export.manifest import read_checkpoint
from gemma4_tune.export.merge import MODELFILE
from gemma4_tune.findings import MODEL_NOT_FOUND, Finding, FindingError, Severity, finding, register
from gemma4_tune.io import NO_SPACE, atomic_directory, check_free_space, json_text, output_errors, write_text_atomic
from gemma4_tune.model.profile import part_of
from gemma4_tune.plan.deployment import LLAMACPP_EXPERTS

DAMAGED_CHECKPOINT = register("G4T912", Severity.ERROR, "Checkpoint lost its clipped tower linears (unwrapped)", (2,))
TENSOR_COUNT_MISMATCH = register("G4T913", Severity.ERROR, "GGUF holds a different number of tensors", (2, 22))
TOWER_LORA_DROPPED = register("G4T914", Severity.WARNING, "Adapter GGUF would drop the tower LoRA", (22,))
QLORA_ADAPTER_GGUF = register("G4T922", Severity.WARNING, "Adapter GGUF of a QLoRA adapter would run on the "
                              "full-precision base", (38,))
CONVERTER_FAILED = register("G4T916", Severity.ERROR, "llama.cpp converter failed", (22,))
MEMORY_TOO_SMALL = register("G4T919", Severity.ERROR, "Machine cannot hold the GGUF conversion", (22,))

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_RECORD = "gemma4_tune_gguf.json"
CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")
#: Tensors ``convert_hf_to_gguf.py`` adds to a Gemma 4 text model (``Gemma4Model.generate_extra_tensors``).
GENERATED_TEXT_TENSORS = 1  # rope_freqs (proportional RoPE of the full-attention layers)
_GGUF_MAGIC = b"GGUF"
#: Bytes per weight in a GGUF of each type (q8_0: blocks of 32 int8 values and one fp16 scale).
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
_DISK_FULL_LINES = ("No space left on device", "Disk quota exceeded")

#: llama.cpp converters whose tensor loop :func:`_bounded_convert` was checked against, byte for byte
#: (``tests/test_gguf.py``): (llama-cpp-python sdist they are taken from, its gguf-py version). Any
#: other release runs as it is, and the estimate counts each tensor whole.
BOUNDED_CONVERTERS = frozenset({("0.3.36", "0.19.0")})
#: Source bytes of one row chunk of a large tensor (a tensor of at most this size is converted whole).
CHUNK_BYTES = 64 * 2**20
#: Memory model of one ``convert_hf_to_gguf.py`` process, measured by sampling /proc/<pid>/status every
#: 0.2 s (E2B-shaped bf16 checkpoints of 1.58 and 2.41 GB, 262144-token vocabulary): ~0.6 GB anonymous
#: before any tensor (interpreter, torch, transformers, tokenizer, GGUF metadata) and ~0.3 GB of mapped
#: libraries, whatever the checkpoint's size; this keeps a margin.
CONVERTER_BASE_BYTES = 10**9
#: ...plus, while one tensor (or row chunk) is converted, anonymous bytes per weight: its float32 copy (4)
#: and, for bf16 and q8_0, the converted row groups and their concatenation (2x the GGUF bytes); f16 takes
#: one copy (2), f32 none. Measured on the whole 403M-weight table: 7.3 (bf16), 5.5 (q8_0, f16), 3.7 (f32);
#: the E2B's 19.1 GB is 4.06x its 4.7 GB table. Source pages are file-backed (page cache, counted in
#: MemAvailable) and not added: in row chunks, each chunk maps only its own rows.
CONVERT_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 6.0, "bf16": 8.0, "q8_0": 4 + 2 * 34 / 32}
GB = 10**9

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- reading GGUF headers


def gguf_header(path: str | Path) -> dict[str, int]:
    """``{"version", "tensors", "kv"}`` from a GGUF file's fixed header (``<4sIQQ``)."""
    with open(path, "rb") as fh:
        raw = fh.read(24)
    if len(raw) != 24 or raw[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    _magic, version, tensors, kv = struct.unpack("<4sIQQ", raw)
    return {"version": version, "tensors": tensors, "kv": kv}


def gguf_tensor_count(path: str | Path) -> int:
    """Number of tensors a GGUF file declares."""
    return gguf_header(path)["tensors"]


def check_tensor_count(path: str | Path, expected: int, what: str) -> int:
    """The GGUF's tensor count, or G4T913 when it is not ``expected``."""
    got = gguf_tensor_count(path)
    if got != expected:
        raise FindingError(finding(
            TENSOR_COUNT_MISMATCH.code, f"{Path(path).name} ({what}) holds {got} tensors, expected {expected} from "
            "the checkpoint: the converter skipped or renamed some without an error",
            "check the checkpoint's key layout against the base (tower `.linear.weight` keys and clamp buffers, "
            "row 2) and convert again; do not ship this GGUF", path=str(path), got=got, expected=expected))
    return got


# --------------------------------------------------------------------------- checks before converting


def _config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FindingError(finding(MODEL_NOT_FOUND.code, f"{model_dir} has no config.json",
                                   "point at a local Hugging Face checkpoint directory (the merged export)"))
    return json.loads(path.read_text())


def has_towers(model_dir: str | Path) -> bool:
    """Whether the checkpoint's config has a vision or audio tower (an mmproj is written then)."""
    config = _config(Path(model_dir))
    return bool(config.get("vision_config") or config.get("audio_config"))


def clipped_tower_linears(model_dir: str | Path) -> dict[str, bool]:
    """``{module path: has clamp buffers}`` of every ``Gemma4ClippableLinear`` in the model, from
    the real module tree on the meta device (no weights read)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ClippableLinear

    from gemma4_tune.export.manifest import _meta_model

    model = _meta_model(Path(model_dir))
    return {name: bool(module.use_clipped_linears) for name, module in model.named_modules()
            if isinstance(module, Gemma4ClippableLinear)}


def check_towers(model_dir: str | Path) -> dict[str, Any]:
    """Refuse (G4T912) a checkpoint whose clipped tower linears lost their official layout (row 2).

    Every ``Gemma4ClippableLinear`` must be stored as ``<module>.linear.weight`` plus, when the
    tower uses clipped linears, its four clamp buffers. Returns the expected tensor counts:
    ``{"text": ..., "towers": ..., "clipped_linears": ...}``.
    """
    model_dir = Path(model_dir)
    keys = set(read_checkpoint(model_dir))
    towers = sorted(k for k in keys if part_of(k) != "text")
    counts = {"text": len(keys) - len(towers), "towers": len(towers), "clipped_linears": 0}
    if not has_towers(model_dir):
        return counts
    wrappers = clipped_tower_linears(model_dir)
    counts["clipped_linears"] = len(wrappers)
    renamed, missing = [], []
    for module, clipped in sorted(wrappers.items()):
        if f"{module}.linear.weight" not in keys:
            (renamed if f"{module}.weight" in keys else missing).append(f"{module}.linear.weight")
        if clipped:
            missing += [f"{module}.{b}" for b in CLIP_BUFFERS if f"{module}.{b}" not in keys]
    if renamed or missing:
        first = (renamed or missing)[0]
        what = (f"{len(renamed)} clipped tower linears are stored as plain `.weight` (first: "
                f"{first.removesuffix('.linear.weight')}.weight)" if renamed
                else f"{len(missing)} tower keys are missing (first: {first})")
        lost = sum(1 for k in missing if k.rsplit(".", 1)[-1] in CLIP_BUFFERS)
        raise FindingError(finding(
            DAMAGED_CHECKPOINT.code, f"{model_dir} is not in the official Gemma 4 layout: {what}"
            + (f", {lost} clamp buffers are gone" if lost else "") + ". This is the 'unwrap' damage (the "
            "Gemma4ClippableLinear wrapper replaced by its inner Linear before saving): the mmproj converter would "
            "write a projector missing most tower tensors without an error, and transformers re-initialises "
            "those weights at random",
            "re-merge with `gemma4-tune export --merged` (it keeps `.linear.weight` keys and the clamp buffers), or "
            "remap the keys against the base checkpoint; never unwrap tower linears", renamed=renamed[:20],
            missing=missing[:20], n_renamed=len(renamed), n_missing=len(missing)))
    return counts


def _adapter_plan(adapter_dir: Path, base_dir: Path) -> tuple[int, list[Finding]]:
    """(expected adapter GGUF tensors, findings that skip the adapter GGUF) for a text LoRA adapter."""
    from gemma4_tune.export.manifest import checked_adapter, manifest_quantization

    if not base_dir.is_dir() or not (base_dir / "config.json").is_file():
        raise FindingError(finding(MODEL_NOT_FOUND.code, f"--base {base_dir} is not a local checkpoint directory",
                                   "convert_lora_to_gguf.py reads the base's config and tokenizer from disk (without "
                                   "it, it tries the Hugging Face hub): pass the local base model directory"))
    layout = checked_adapter(adapter_dir, base_dir).layout
    deltas = [d for group in layout.deltas.values() for d in group]
    tower = sorted({d.base_key for d in deltas if part_of(d.base_key) != "text"})
    experts = sorted({d.base_key for d in deltas if d.kind != "linear"})
    out: list[Finding] = []
    if tower:
        out.append(finding(TOWER_LORA_DROPPED.code, f"the adapter has LoRA on {len(tower)} vision/audio tower "
                           f"modules (first: {tower[0]}); convert_lora_to_gguf.py drops them without an error, so "
                           "an adapter GGUF would lose the towers' fine-tune: not written",
                           "use the merged GGUF (model + mmproj), which carries every tower change",
                           modules=tower[:20]))
    if experts:
        out.append(finding(LLAMACPP_EXPERTS.code, f"the adapter has MoE expert LoRA on {len(experts)} expert tensors "
                           f"(first: {experts[0]}); convert_lora_to_gguf.py cannot map them: not written",
                           "use the merged GGUF: merge first, then convert", tensors=experts[:20]))
    quant = manifest_quantization(adapter_dir)
    if quant is not None:
        out.append(finding(QLORA_ADAPTER_GGUF.code, f"the adapter was trained on the base in {quant.describe()}; "
                           "llama.cpp would apply an adapter GGUF to the full-precision base GGUF, another model "
                           "than the one trained (row 38): not written", "use the merged GGUF (export --merged "
                           "merges into the dequantized 4-bit weights, the model you trained)"))
    text = [d for d in deltas if d.kind == "linear" and part_of(d.base_key) == "text"]
    return 2 * len(text), out


def gguf_size(model_dir: str | Path, gguf_type: str, *, with_base: bool = False) -> int:
    """Bytes the GGUF files of ``model_dir`` take in ``gguf_type`` (model + mmproj; ``with_base``: the
    base text model again, for the adapter GGUF pair), from the safetensors headers."""
    tensors = read_checkpoint(Path(model_dir)).values()
    weights = {"text": 0, "towers": 0}
    for info in tensors:
        weights["text" if part_of(info.name) == "text" else "towers"] += info.nbytes // info.itemsize
    total = weights["text"] * (2 if with_base else 1) + weights["towers"]
    return int(total * GGUF_BYTES_PER_WEIGHT[gguf_type])


# --------------------------------------------------------------------------- memory


def available_memory() -> int:
    """Bytes this machine can still give a new process: ``MemAvailable`` (/proc/meminfo), lowered to
    the headroom of the cgroup (v2 ``memory.max`` - ``memory.current``) when it sets a limit."""
    with open("/proc/meminfo") as fh:
        available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def _chunk_weights(shape: tuple[int, ...], itemsize: int) -> int:
    """Weights converted at once for a tensor of ``shape``: all of it, or one row chunk of a large one."""
    weights = math.prod(shape)
    if len(shape) < 2 or weights * itemsize <= CHUNK_BYTES:
        return weights
    row = math.prod(shape[1:])
    return min(shape[0], max(1, CHUNK_BYTES // (row * itemsize))) * row


def conversion_memory(model_dir: str | Path, gguf_type: str, *, towers: bool = False, bounded: bool = True) -> int:
    """Peak bytes of memory one ``convert_hf_to_gguf.py`` run over ``model_dir`` needs (``towers``: the
    ``--mmproj`` run over the tower tensors; else the text model), from the safetensors headers.

    :data:`CONVERTER_BASE_BYTES` plus the tensor converted at once that needs most:
    :data:`CONVERT_BYTES_PER_WEIGHT` times its weights, a row chunk of :data:`CHUNK_BYTES` of a larger
    2-D or 3-D tensor when ``bounded`` (:func:`_bounded_convert`), else the whole tensor.
    """
    tensors = [t for t in read_checkpoint(Path(model_dir)).values() if (part_of(t.name) != "text") == towers]
    weights = max((_chunk_weights(t.shape, t.itemsize) if bounded else math.prod(t.shape) for t in tensors),
                  default=0)
    return int(CONVERTER_BASE_BYTES + weights * CONVERT_BYTES_PER_WEIGHT[gguf_type])


def conversion_jobs(model_dir: str | Path, *, mmproj: bool, base_dir: str | Path | None = None,
                    ) -> list[tuple[str | Path, bool, str]]:
    """The ``convert_hf_to_gguf.py`` runs of an export, as :func:`check_memory` takes them: the text model,
    the towers (``mmproj``) and, for an adapter GGUF, the base text model."""
    jobs: list[tuple[str | Path, bool, str]] = [(model_dir, False, "the text model")]
    if mmproj:
        jobs.append((model_dir, True, "the towers"))
    if base_dir is not None:
        jobs.append((base_dir, False, "the base text model"))
    return jobs


def check_memory(jobs: Sequence[tuple[str | Path, bool, str]], gguf_type: str, *, bounded: bool) -> int:
    """Refuse (G4T919) a conversion this machine cannot hold; ``jobs`` is ``(model_dir, towers, what)``, run
    one after another. Returns the bytes the largest needs."""
    needs = [(conversion_memory(d, gguf_type, towers=t, bounded=bounded), d, what) for d, t, what in jobs]
    needed, model_dir, what = max(needs, key=lambda n: n[0])
    available = available_memory()
    if needed > available:
        how = (f"{CONVERTER_BASE_BYTES / GB:.1f} GB for the converter and its largest tensor in row chunks of "
               f"{CHUNK_BYTES // 2**20} MiB" if bounded else "the converter converts its largest tensor whole")
        fix = ("free memory (stop other jobs on this machine) or convert on one with more" if bounded else
               "reinstall the llama.cpp converters gemma4-tune bounds (`gemma4-tune engines install llama.cpp`), "
               "free memory (stop other jobs), or convert on a machine with more")
        raise FindingError(finding(
            MEMORY_TOO_SMALL.code, f"converting {what} of {model_dir} to a {gguf_type} GGUF needs about "
            f"{needed / GB:.1f} GB of memory ({how}), but this machine has {available / GB:.1f} GB available: "
            "the converter would be killed part way", fix, needed_bytes=needed, available_bytes=available,
            bounded=bounded))
    return needed


# --------------------------------------------------------------------------- running converters


def _converter_failure(script: str, rc: int, tail: Sequence[str], log_path: Path, what: str) -> FindingError:
    lines = list(tail)
    full = next((ln for ln in lines if any(m in ln for m in _DISK_FULL_LINES)), None)
    if full is not None:
        return FindingError(finding(NO_SPACE.code, f"the disk filled up while llama.cpp's {script} was writing "
                                    f"{what}: {full.strip()}; the unfinished files have been removed",
                                    "free space on that disk and run the export again, or give --gguf a folder "
                                    "on a disk with more room", log=str(log_path)))
    causes = [ln for ln in lines if re.search(r"\b\w*(Error|Exception)\b", ln)]
    head = [f"cause: {causes[-1].strip()}"] if causes else []
    return FindingError(finding(
        CONVERTER_FAILED.code, f"llama.cpp's {script} failed converting {what} (exit {rc}):\n"
        + "\n".join(head + lines[-6:]) + f"\n(full log: {log_path})",
        "read the converter log; a MoE expert LoRA or a LoRA without a local --base cannot be converted (row 22): "
        "convert the merged checkpoint instead", log=str(log_path), exit_code=rc))


def _bounded_convert(chunk_bytes: int, script: str, argv: list[str]) -> None:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` (``script``, with ``argv``) in bounded memory, same output.

    The only patch of llama.cpp behaviour, for the releases in :data:`BOUNDED_CONVERTERS`. It runs in the
    converter's interpreter on its own (its source is sent with ``python -c``; nothing of gemma4_tune is
    imported there). It wraps the chosen model class's ``modify_tensors``: when that yields the tensor it
    was given, read from one safetensors tensor, unchanged or cut to its leading rows (Gemma's
    ``embed_tokens[:n_vocab]``), and the rows hold more than ``chunk_bytes``, the tensor becomes a
    ``gguf.LazyChunkedTensor`` whose chunks each map only their own rows of the file and convert as the
    converter does (``.to(dtype)``, ``.numpy()``; quantized per chunk at write time). Every GGUF type
    converts row by row (q8_0 blocks never cross a row), so the bytes are the converter's own. Anything
    else (a tensor the model class changes, a generated one) goes through the converter untouched.
    """
    import os
    import runpy
    import sys

    import numpy as np
    import torch

    sys.path[0] = os.path.dirname(script)
    import conversion
    import gguf
    from conversion.base import LazyTorchTensor

    chunked: list[str] = []  # GGUF names of the tensors written in row chunks

    def source(model: Any, name: str) -> Any:
        """The safetensors tensor ``name`` is read from, when its loader is the converter's own."""
        load = model.model_tensors.get(name)
        defaults = getattr(load, "__defaults__", None) or (None,)
        own = getattr(getattr(load, "__code__", None), "co_qualname", "") == "ModelBase.index_tensors.<locals>.<lambda>"
        return defaults[0] if own and isinstance(defaults[0], gguf.utility.LocalTensor) else None

    def rows(given: Any, out: Any) -> range | None:
        """The rows of ``given`` that ``out`` is: all of them, or a leading slice ``given[:n]``."""
        if out is given:
            return range(given.shape[0])
        if (isinstance(out, LazyTorchTensor) and out._func is torch.Tensor.__getitem__ and len(out._args) == 2
                and out._args[0] is given and isinstance(out._args[1], slice)):
            kept = range(given.shape[0])[out._args[1]]
            if kept.step == 1 and tuple(out.shape) == (len(kept), *given.shape[1:]):
                return kept
        return None

    def row_chunks(tensor: Any, dtype: torch.dtype, kept: range) -> Any:
        """``tensor``'s rows ``kept`` as a LazyChunkedTensor of ``dtype`` rows, each chunk mapped on its own."""
        file, offset = tensor.data_range.filename, tensor.data_range.offset
        stored = LazyTorchTensor._dtype_str_map[tensor.dtype]
        row_shape = tuple(tensor.shape[1:])
        row_bytes = stored.itemsize * int(np.prod(row_shape))
        step = max(1, chunk_bytes // row_bytes)

        def chunk(lo: int, hi: int) -> Any:
            def load() -> np.ndarray:
                raw = np.memmap(file, mode="c", offset=offset + lo * row_bytes, shape=(hi - lo) * row_bytes)
                return torch.from_numpy(raw).view(stored).reshape((hi - lo, *row_shape)).to(dtype).numpy()
            return load

        loads = [chunk(lo, min(lo + step, kept.stop)) for lo in range(kept.start, kept.stop, step)]
        return gguf.LazyChunkedTensor(loads, shape=(len(kept), *row_shape), dtype=LazyTorchTensor._dtype_map[dtype])

    def bounded(modify: Any) -> Any:
        def modify_tensors(self: Any, data_torch: Any, name: str, bid: int | None) -> list[tuple[str, Any]]:
            out = list(modify(self, data_torch, name, bid))
            tensor = source(self, name)
            if (tensor is None or len(out) != 1 or len(tensor.shape) < 2 or sys.byteorder != "little"
                    or tuple(data_torch.shape) != tuple(tensor.shape)
                    or data_torch.dtype not in LazyTorchTensor._dtype_map):
                return out
            new_name, result = out[0]
            kept = rows(data_torch, result)
            row_bytes = LazyTorchTensor._dtype_str_map[tensor.dtype].itemsize * int(np.prod(tensor.shape[1:]))
            if kept is None or len(kept) < 2 or len(kept) * row_bytes <= chunk_bytes:
                return out
            chunked.append(new_name)
            return [(new_name, row_chunks(tensor, data_torch.dtype, kept))]
        return modify_tensors

    model_class = conversion.get_model_class

    def get_model_class(*args: Any, **kwargs: Any) -> Any:
        cls = model_class(*args, **kwargs)
        cls.modify_tensors = bounded(cls.modify_tensors)
        return cls

    conversion.get_model_class = get_model_class
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    if chunked:
        print(f"{_BOUNDED_MARK}{len(chunked)} tensors written in row chunks of {chunk_bytes} bytes (bounded memory)",
              flush=True)


#: Start of the line :func:`_bounded_convert` ends with when it chunked a tensor (echoed through the log).
_BOUNDED_MARK = "INFO:gemma4-tune:"


def bounded_converter(install: Any) -> bool:
    """Whether a llama.cpp install's converters are a release :func:`_bounded_convert` was checked against."""
    from gemma4_tune.engines.llamacpp_env import CONVERTER_PACKAGE

    stamp = install.stamp
    return (stamp.get("pins", {}).get(CONVERTER_PACKAGE), stamp.get("gguf_py_version")) in BOUNDED_CONVERTERS


def _bounded_command(install: Any, script: str, chunk_bytes: int) -> list[str]:
    """``python -c`` running :func:`_bounded_convert` on ``script``; the converter's arguments follow."""
    call = f"_bounded_convert({chunk_bytes}, {str(install.converters / script)!r}, sys.argv[1:])"
    code = "\n".join(["from __future__ import annotations", "import sys", "from typing import Any",
                      f"_BOUNDED_MARK = {_BOUNDED_MARK!r}", inspect.getsource(_bounded_convert), call])
    return [install.python, "-c", code]


#: Converter warnings every Gemma 4 conversion prints (not echoed; kept in the log): the writer sets
#: some keys twice, the later per-layer value winning, and the tokenizer's pair template names <bos>.
#: verify --engine llama.cpp checks the converted model itself.
_BENIGN_WARNINGS = ("Duplicated key name", "Unknown separator token")


def run_converter(script: str, args: Sequence[str], *, what: str, log: Log | None = None,
                  chunk_bytes: int | None = None) -> float:
    """Run one of llama.cpp's converter scripts from the llama.cpp install; return its seconds.

    ``chunk_bytes`` (``convert_hf_to_gguf.py`` only): run it through :func:`_bounded_convert`, with row
    chunks of that many bytes, when :func:`bounded_converter` allows. Output goes to a log file (kept,
    and named in G4T916, when the converter fails); warnings and the final line are echoed through ``log``.
    """
    from gemma4_tune.engines.llamacpp_env import require_llamacpp

    log = log or _stderr
    install = require_llamacpp()
    prefix = install.converter(script)
    if chunk_bytes is not None and bounded_converter(install):
        prefix = _bounded_command(install, script, chunk_bytes)
    cmd = [*prefix, *args]
    fd, name = tempfile.mkstemp(prefix=f"gguf-{Path(script).stem}-", suffix=".log")
    log_path = Path(name)
    tail: collections.deque[str] = collections.deque(maxlen=40)
    log(f"[gguf] {script}: {what}")
    start = time.monotonic()
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=install.converter_environ())
        assert proc.stdout is not None
        for raw in proc.stdout:
            log_file.write(raw)
            line = raw.rstrip("\n")
            if line.strip():
                tail.append(line)
            if line.startswith(("WARNING", "ERROR")) and not any(b in line for b in _BENIGN_WARNINGS):
                log(f"  {line}")
            elif line.startswith(_BOUNDED_MARK):
                log(f"[gguf] {line.removeprefix(_BOUNDED_MARK)}")
        rc = proc.wait()
    seconds = time.monotonic() - start
    if rc != 0:
        raise _converter_failure(script, rc, tail, log_path, what)
    log_path.unlink(missing_ok=True)
    log(f"[gguf] {what} converted in {seconds:.1f} s")
    return seconds


def convert_model(model_dir: str | Path, out_file: str | Path, gguf_type: str, *, mmproj: bool = False,
                  log: Log | None = None, chunk_bytes: int = CHUNK_BYTES) -> float:
    """``convert_hf_to_gguf.py`` (``--mmproj`` for the towers) into ``out_file``, large tensors in row chunks of
    ``chunk_bytes`` (:func:`_bounded_convert`); returns seconds."""
    args = [str(model_dir), "--outtype", gguf_type, "--outfile", str(out_file)] + (["--mmproj"] if mmproj else [])
    part = "towers (mmproj)" if mmproj else "text model"
    return run_converter("convert_hf_to_gguf.py", args, log=log, chunk_bytes=chunk_bytes,
                         what=f"{part} of {model_dir} -> {Path(out_file).name}")


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out_file: str | Path, gguf_type: str, *,
                 log: Log | None = None) -> float:
    """``convert_lora_to_gguf.py ADAPTER --base BASE`` into ``out_file``; returns seconds (no checks:
    :func:`export_gguf` refuses what it cannot convert first)."""
    args = [str(adapter_dir), "--base", str(base_dir), "--outtype", gguf_type, "--outfile", str(out_file)]
    return run_converter("convert_lora_to_gguf.py", args, log=log,
                         what=f"LoRA adapter {adapter_dir} -> {Path(out_file).name}")


# --------------------------------------------------------------------------- Modelfile


def modelfile_text(gguf_type: str, *, mmproj: bool, adapter: bool) -> str:
    """The Ollama Modelfile written beside the GGUF files (same conventions as merge.py's)."""
    lines = [
        "# Ollama Modelfile for the GGUF export of this merged Gemma 4 checkpoint (written by gemma4-tune).",
        "# Ollama no longer takes LoRA adapters: the ADAPTER instruction was removed in v0.34.1",
        "# (ollama/ollama#15307), so this points at the merged weights converted by llama.cpp.",
        "#   ollama create my-gemma4 -f Modelfile",
    ]
    if mmproj:
        lines += [
            f"# mmproj-{gguf_type}.gguf holds the vision/audio towers for llama.cpp:",
            f"#   llama-server -m model-{gguf_type}.gguf --mmproj mmproj-{gguf_type}.gguf",
            "# Ollama does not reliably attach a separate projector file (ollama/ollama#9967), so the model",
            "# created from this file is text-only there.",
        ]
    if adapter:
        lines += [
            f"# adapter-{gguf_type}.gguf is the LoRA adapter for llama.cpp on the unmerged base:",
            f"#   llama-server -m base-{gguf_type}.gguf --lora adapter-{gguf_type}.gguf",
        ]
    lines += [
        "# No TEMPLATE on purpose: the chat template ships inside the GGUF; add one only if",
        "# `ollama show --modelfile my-gemma4` renders turns differently from `<|turn>user ... <turn|>`.",
        f"FROM ./model-{gguf_type}.gguf",
        'PARAMETER stop "<turn|>"',
    ]
    return "\n".join(lines) + "\n"


_REPOINT_MARK = "# FROM points at the GGUF export"


def repoint_modelfile(merged_dir: str | Path, gguf_path: str | Path) -> Path:
    """Point the merged checkpoint's Modelfile (``FROM .``, written by merge.py) at a GGUF export.

    The path is written relative to ``merged_dir`` (``FROM ../gguf/model-f32.gguf``); a comment
    says so. Idempotent; a missing Modelfile is written from merge.py's text first.
    """
    from gemma4_tune.export.merge import MODELFILE_TEXT

    merged_dir = Path(merged_dir)
    path = merged_dir / MODELFILE
    text = path.read_text() if path.is_file() else MODELFILE_TEXT
    rel = os.path.relpath(Path(gguf_path).resolve(), merged_dir.resolve())
    rel = rel if rel.startswith(".") else f"./{rel}"
    text = text.replace("points at the merged weights in this directory.", "points at the merged weights (their GGUF).")
    out, replaced = [], False
    for line in text.splitlines():
        if line.startswith(_REPOINT_MARK):
            continue
        if re.match(r"FROM\s", line) and not replaced:
            out.append(f"{_REPOINT_MARK} (llama.cpp's converter); `FROM .` would import the safetensors here.")
            out.append(f"FROM {rel}")
            replaced = True
            continue
        out.append(line)
    if not replaced:
        out += [f"{_REPOINT_MARK} (llama.cpp's converter).", f"FROM {rel}"]
    write_text_atomic(path, "\n".join(out) + "\n")
    return path


# --------------------------------------------------------------------------- export


def plan_gguf_export(merged_dir: str | Path, adapter_dir: str | Path | None = None,
                     base_dir: str | Path | None = None) -> dict[str, Any]:
    """Every check :func:`export_gguf` makes before converting, without converting anything.

    Raises G4T912 (damaged checkpoint), G4T001 (no such directory, non-local base) and the adapter
    fit findings (G4T80x); returns ``{"counts", "mmproj", "adapter_tensors", "convert_adapter",
    "findings"}`` where ``findings`` are the warnings that skip the adapter GGUF (G4T914, G4T204).
    """
    merged_dir = Path(merged_dir)
    if not merged_dir.is_dir():
        raise FindingError(finding(MODEL_NOT_FOUND.code, f"{merged_dir} is not a directory",
                                   "point at the merged checkpoint (`gemma4-tune export --merged DIR`)"))
    counts = check_towers(merged_dir)
    plan: dict[str, Any] = {"counts": counts, "mmproj": has_towers(merged_dir), "adapter_tensors": 0,
                            "convert_adapter": False, "findings": []}
    if adapter_dir is not None:
        if base_dir is None:
            raise FindingError(finding(MODEL_NOT_FOUND.code, "an adapter GGUF needs --base, the local base checkpoint",
                                       "pass the base model directory the adapter was trained on"))
        tensors, skipped = _adapter_plan(Path(adapter_dir), Path(base_dir))
        plan.update(adapter_tensors=tensors, findings=skipped, convert_adapter=not skipped and tensors > 0)
        if plan["convert_adapter"]:
            plan["base_counts"] = check_towers(base_dir)
    return plan


def export_gguf(merged_dir: str | Path, out_dir: str | Path, gguf_type: str = "f32", log: Log | None = None,
                adapter_dir: str | Path | None = None, base_dir: str | Path | None = None, *,
                overwrite: bool = False, repoint: bool = True) -> dict[str, Any]:
    """Convert a merged checkpoint (and optionally a text LoRA adapter) to GGUF with llama.cpp's converters.

    ``gguf_type``: f32, f16, bf16 or q8_0 (quantised by the converter itself). Writes
    ``model-<T>.gguf``, ``mmproj-<T>.gguf`` when the model has towers, and with ``adapter_dir`` and
    a local ``base_dir`` also ``base-<T>.gguf`` + ``adapter-<T>.gguf``; then a Modelfile and a record.
    ``repoint`` points the merged checkpoint's own Modelfile at the new GGUF.

    Refuses before converting: a damaged (unwrapped) checkpoint (G4T912), a non-local base (G4T001),
    an adapter that does not fit the base (G4T80x), a conversion this machine cannot hold (G4T919); skips
    the adapter GGUF with a warning for tower LoRA (G4T914) or MoE expert LoRA (G4T204). Raises G4T911
    without llama.cpp, G4T916 when a converter fails and G4T913 when a GGUF's tensor count is not the
    checkpoint's. Large tensors are converted in row chunks (:func:`_bounded_convert`), same bytes.
    """
    log = log or _stderr
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    plan = plan_gguf_export(merged_dir, adapter_dir, base_dir)
    counts, mmproj, findings = plan["counts"], plan["mmproj"], list(plan["findings"])
    convert_adapter, adapter_tensors = plan["convert_adapter"], plan["adapter_tensors"]
    for f in findings:
        log(f"[gguf] {f.one_line()}")
    from gemma4_tune.engines.llamacpp_env import require_llamacpp

    install = require_llamacpp()
    check_free_space([(out_dir, gguf_size(merged_dir, gguf_type, with_base=convert_adapter), "the GGUF files")])
    bounded = bounded_converter(install)
    memory = check_memory(conversion_jobs(merged_dir, mmproj=mmproj, base_dir=base_dir if convert_adapter else None),
                          gguf_type, bounded=bounded)
    files: dict[str, str] = {}
    tensors: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    started = time.monotonic()
    with output_errors(out_dir, "the GGUF files"), atomic_directory(out_dir, overwrite=overwrite) as tmp:
        jobs: list[tuple[str, Path, int, Callable[[Path], float]]] = [
            ("model", tmp / f"model-{gguf_type}.gguf", counts["text"] + GENERATED_TEXT_TENSORS,
             lambda p: convert_model(merged_dir, p, gguf_type, log=log)),
        ]
        if mmproj:
            jobs.append(("mmproj", tmp / f"mmproj-{gguf_type}.gguf", counts["towers"],
                         lambda p: convert_model(merged_dir, p, gguf_type, mmproj=True, log=log)))
        if convert_adapter:
            assert base_dir is not None and adapter_dir is not None
            jobs.append(("base", tmp / f"base-{gguf_type}.gguf", plan["base_counts"]["text"] + GENERATED_TEXT_TENSORS,
                         lambda p: convert_model(base_dir, p, gguf_type, log=log)))
            jobs.append(("adapter", tmp / f"adapter-{gguf_type}.gguf", adapter_tensors,
                         lambda p: convert_lora(adapter_dir, base_dir, p, gguf_type, log=log)))
        for name, path, expected, run in jobs:
            seconds[name] = round(run(path), 2)
            got = check_tensor_count(path, expected, name)
            tensors[name] = {"expected": expected, "written": got}
            files[name] = path.name
        (tmp / MODELFILE).write_text(modelfile_text(gguf_type, mmproj=mmproj, adapter=convert_adapter))
        record = {
            "kind": "gemma4_tune.gguf", "schema": 1, "gguf_type": gguf_type,
            "merged": str(merged_dir.resolve()),
            "base": str(Path(base_dir).resolve()) if convert_adapter and base_dir else None,
            "adapter": str(Path(adapter_dir).resolve()) if convert_adapter and adapter_dir else None,
            "files": files, "tensors": tensors, "seconds": seconds,
            "converter": {k: install.stamp.get(k) for k in ("pins", "gguf_py_version", "llama_cpp_build")},
            "memory": {"estimated_peak_bytes": memory, "bounded": bounded,
                       "chunk_bytes": CHUNK_BYTES if bounded else None},
            "findings": [f.to_dict() for f in findings],
        }
        (tmp / GGUF_RECORD).write_text(json_text(record) + "\n")
    repointed = None
    if repoint and (merged_dir / MODELFILE).is_file():
        repointed = str(repoint_modelfile(merged_dir, out_dir / files["model"]))
    total = time.monotonic() - started
    log(f"[gguf] wrote {', '.join(files.values())} to {out_dir} in {total:.1f} s")
    return {
        "out_dir": str(out_dir), "gguf_type": gguf_type,
        "files": {k: str(out_dir / v) for k, v in files.items()},
        "tensors": tensors, "seconds": seconds, "total_seconds": round(total, 2),
        "modelfile": str(out_dir / MODELFILE), "repointed_modelfile": repointed,
        "findings": findings,
    }


def read_gguf_record(gguf_dir: str | Path) -> dict[str, Any]:
    """The ``gemma4_tune_gguf.json`` record of an :func:`export_gguf` output directory."""
    return json.loads((Path(gguf_dir) / GGUF_RECORD).read_text())


__all__ = ["BOUNDED_CONVERTERS", "CHUNK_BYTES", "CONVERTER_FAILED", "DAMAGED_CHECKPOINT", "GGUF_TYPES",
           "MEMORY_TOO_SMALL", "TENSOR_COUNT_MISMATCH", "TOWER_LORA_DROPPED", "available_memory", "bounded_converter",
           "check_memory", "check_tensor_count", "check_towers", "conversion_memory", "convert_lora", "convert_model",
           "export_gguf", "gguf_header", "gguf_tensor_count", "modelfile_text", "plan_gguf_export",
           "read_gguf_record", "repoint_modelfile"]
