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

After each conversion the GGUF header's tensor count must equal what the checkpoint holds
(G4T913): text keys + the generated ``rope_freqs``, every tower key, two tensors per text LoRA
module. A converter that fails raises G4T916 with its last lines. Everything is written into a
temporary sibling directory that replaces ``out_dir`` only when complete.
"""

from __future__ import annotations

import collections
import json
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

from gemma4_tune.engines import LLAMACPP_EXPERTS
from gemma4_tune.export.manifest import read_checkpoint
from gemma4_tune.export.merge import MODELFILE
from gemma4_tune.findings import MODEL_NOT_FOUND, Finding, FindingError, Severity, finding, register
from gemma4_tune.io import NO_SPACE, atomic_directory, check_free_space, json_text, output_errors, write_text_atomic

DAMAGED_CHECKPOINT = register("G4T912", Severity.ERROR, "Checkpoint lost its clipped tower linears (unwrapped)", (2,))
TENSOR_COUNT_MISMATCH = register("G4T913", Severity.ERROR, "GGUF holds a different number of tensors", (2, 22))
TOWER_LORA_DROPPED = register("G4T914", Severity.WARNING, "Adapter GGUF would drop the tower LoRA", (22,))
CONVERTER_FAILED = register("G4T916", Severity.ERROR, "llama.cpp converter failed", (22,))

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_RECORD = "gemma4_tune_gguf.json"
TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
CLIP_BUFFERS = ("input_min", "input_max", "output_min", "output_max")
#: Tensors ``convert_hf_to_gguf.py`` adds to a Gemma 4 text model (``Gemma4Model.generate_extra_tensors``).
GENERATED_TEXT_TENSORS = 1  # rope_freqs (proportional RoPE of the full-attention layers)
_GGUF_MAGIC = b"GGUF"
#: Bytes per weight in a GGUF of each type (q8_0: blocks of 32 int8 values and one fp16 scale).
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
_DISK_FULL_LINES = ("No space left on device", "Disk quota exceeded")

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
    towers = sorted(k for k in keys if k.startswith(TOWER_PREFIXES))
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
    from gemma4_tune.export.manifest import checked_adapter

    if not base_dir.is_dir() or not (base_dir / "config.json").is_file():
        raise FindingError(finding(MODEL_NOT_FOUND.code, f"--base {base_dir} is not a local checkpoint directory",
                                   "convert_lora_to_gguf.py reads the base's config and tokenizer from disk (without "
                                   "it, it tries the Hugging Face hub): pass the local base model directory"))
    layout = checked_adapter(adapter_dir, base_dir).layout
    deltas = [d for group in layout.deltas.values() for d in group]
    tower = sorted({d.base_key for d in deltas if d.base_key.startswith(TOWER_PREFIXES)})
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
    text = [d for d in deltas if d.kind == "linear" and not d.base_key.startswith(TOWER_PREFIXES)]
    return 2 * len(text), out


def gguf_size(model_dir: str | Path, gguf_type: str, *, with_base: bool = False) -> int:
    """Bytes the GGUF files of ``model_dir`` take in ``gguf_type`` (model + mmproj; ``with_base``: the
    base text model again, for the adapter GGUF pair), from the safetensors headers."""
    tensors = read_checkpoint(Path(model_dir)).values()
    weights = {"text": 0, "towers": 0}
    for info in tensors:
        weights["towers" if info.name.startswith(TOWER_PREFIXES) else "text"] += info.nbytes // info.itemsize
    total = weights["text"] * (2 if with_base else 1) + weights["towers"]
    return int(total * GGUF_BYTES_PER_WEIGHT[gguf_type])


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


#: Converter warnings every Gemma 4 conversion prints (not echoed; kept in the log): the writer sets
#: some keys twice, the later per-layer value winning, and the tokenizer's pair template names <bos>.
#: verify --engine llama.cpp checks the converted model itself.
_BENIGN_WARNINGS = ("Duplicated key name", "Unknown separator token")


def run_converter(script: str, args: Sequence[str], *, what: str, log: Log | None = None) -> float:
    """Run one of llama.cpp's converter scripts from the llama.cpp install; return its seconds.

    Output goes to a log file (kept, and named in G4T916, when the converter fails); warnings
    and the final line are echoed through ``log``.
    """
    from gemma4_tune.verify.llamacpp_env import require_llamacpp

    log = log or _stderr
    install = require_llamacpp()
    cmd = [*install.converter(script), *args]
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
        rc = proc.wait()
    seconds = time.monotonic() - start
    if rc != 0:
        raise _converter_failure(script, rc, tail, log_path, what)
    log_path.unlink(missing_ok=True)
    log(f"[gguf] {what} converted in {seconds:.1f} s")
    return seconds


def convert_model(model_dir: str | Path, out_file: str | Path, gguf_type: str, *, mmproj: bool = False,
                  log: Log | None = None) -> float:
    """``convert_hf_to_gguf.py`` (``--mmproj`` for the towers) into ``out_file``; returns seconds."""
    args = [str(model_dir), "--outtype", gguf_type, "--outfile", str(out_file)] + (["--mmproj"] if mmproj else [])
    part = "towers (mmproj)" if mmproj else "text model"
    return run_converter("convert_hf_to_gguf.py", args, log=log, what=f"{part} of {model_dir} -> {Path(out_file).name}")


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
    an adapter that does not fit the base (G4T80x); skips the adapter GGUF with a warning for tower
    LoRA (G4T914) or MoE expert LoRA (G4T204). Raises G4T911 without llama.cpp, G4T916 when a converter
    fails and G4T913 when a GGUF's tensor count is not the checkpoint's.
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
    from gemma4_tune.verify.llamacpp_env import require_llamacpp

    install = require_llamacpp()
    check_free_space([(out_dir, gguf_size(merged_dir, gguf_type, with_base=convert_adapter), "the GGUF files")])
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


__all__ = ["CONVERTER_FAILED", "DAMAGED_CHECKPOINT", "GGUF_TYPES", "TENSOR_COUNT_MISMATCH",
           "TOWER_LORA_DROPPED", "check_tensor_count", "check_towers", "convert_lora", "convert_model", "export_gguf",
           "gguf_header", "gguf_tensor_count", "modelfile_text", "plan_gguf_export", "read_gguf_record",
           "repoint_modelfile"]
