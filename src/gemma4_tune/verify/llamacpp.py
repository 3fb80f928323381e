"""llama.cpp: does the GGUF export, run by a real llama.cpp, behave like the model in transformers?

The GGUF files of ``export/gguf.py`` are run by ``llamacpp_runner.py`` (prebuilt libllama of the
llama.cpp install, ``llamacpp_env``) on token-id prompts: every position's logits, one batch per
prompt, f32 KV cache, no flash attention. The reference is stock transformers on CPU in float32
(``reference.token_logits``): the merged checkpoint for ``model-<T>.gguf``; base + adapter in PEFT (and
the base alone, under ``disable_adapter()``) for ``base-<T>.gguf`` + ``adapter-<T>.gguf``.

Per comparison: max |logit difference|, mean and max KL(reference || GGUF) over positions, the
share of positions whose reference top-1 token is among the GGUF's top 5, and the exact greedy
(argmax) agreement, which is reported, not gated: near-ties of tiny random models flip it under
any rounding. Tolerances by GGUF type (:data:`TOLERANCES`) come from measurements on tiny
E2B/31B/26B-A4B models (merged, CPU): f32 max |logit diff| 7e-3 to 1.4e-2 and mean KL 4e-7
to 1e-6; f16 KL 6e-6 to 1.1e-5; bf16 6.5e-4; q8_0 4e-3 to 6.4e-3, where 1 to 2 positions in 75
lost the reference's top-1 from the top 5 (tiny random models have near-flat logits). KL bounds
keep at least 10x headroom; the top-5 bound is every position for f32/f16, 98% for bf16 and 90%
for q8_0. A model with an adapter GGUF must also show that the adapter changes llama.cpp's
output (G4T611, row 4): its effect must be at least half the reference's. The projector
(``mmproj``) is loaded by libmtmd with the text model and must support exactly the towers the
config has.

Image and audio prompts (``verify.prompts``) run through libmtmd with the ``mmproj``: the runner
splits each into chunks (``mtmd_tokenize``), decodes the text chunks with every position's logits
and lets libmtmd encode and decode each medium, so the logits at every text position (before and
after the media) are compared with the transformers + PEFT reference
(``reference.logits_by_modality``), within :data:`MEDIA_TOLERANCES`. libmtmd is given each image
at the size the processor resizes it to (the same pixels reach both towers) and the processor's
token budget; the chunk layout must then be the processor's: the same text tokens (begin/end of
media included) and as many soft tokens per medium (G4T915 otherwise). How libmtmd sizes the
original image itself is reported as a G4T915 warning when its soft-token count differs. An image
row that fails is run against the reference with the other image-token attention: when llama.cpp
matches that one, the finding is G4T921 and says which attention each side uses (row 31). A
modality libmtmd cannot run is a G4T920 warning row that compared nothing. Findings: G4T915
(parity, layout), G4T921 (image attention), G4T920 (modality not run), G4T918 (libmtmd sizes a
user's image otherwise than the processor), G4T611 (no effect), G4T917
(llama.cpp could not run the file), G4T911 (not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.verify.prompts import TEXT_PROMPTS
from gemma4_tune.verify.reference import attention_name, bidirectional_vision, logits_by_modality, token_logits
from gemma4_tune.verify.verdict import IMAGE_ATTENTION_DIFFERS, MODALITY_NOT_RUN, NO_EFFECT_IN_ENGINE

GGUF_PARITY_FAILED = register("G4T915", Severity.ERROR, "GGUF output differs from transformers", (2, 22))
RUN_FAILED = register("G4T917", Severity.ERROR, "llama.cpp could not run the GGUF", (22,))
IMAGE_SIZED_OTHERWISE = register("G4T918", Severity.WARNING, "llama.cpp sizes an image otherwise than the "
                                 "processor", (31,))

RUNNER = Path(__file__).parents[1] / "engines" / "llamacpp_runner.py"
DEFAULT_TIMEOUT_S = 600.0
#: The adapter must move llama.cpp's logits by at least this share of what it moves the reference's.
MIN_EFFECT_SHARE = 0.5
#: ... and by at least this much in absolute terms (an adapter that changes nothing fails either way).
MIN_EFFECT = 1e-3
#: Why the video prompt is a not-run row (G4T920): the runner drives libmtmd's C API on bitmaps (``mtmd_tokenize``:
#: images, audio); b11739 reads video only through its ffmpeg-subprocess helper (``mtmd_helper_video_init``), which
#: decodes and samples a video file itself, so the processor's frames and timestamps cannot be handed to it.
VIDEO_NOT_RUN = ("libmtmd reads video only through its ffmpeg helper (mtmd_helper_video), which decodes and samples "
                 "a video file itself; the runner hands libmtmd images and audio clips (bitmaps), so Gemma 4's "
                 "processed video frames cannot be compared position by position")
_ORDER = ("f32", "f16", "bf16", "q8_0")
#: Start and end of a chat turn: the GGUF vocabulary must mark both control, and the end as end-of-generation.
TURN_TOKENS = ("<|turn>", "<turn|>")

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Tolerance:
    """What a GGUF of one type must meet against the float32 reference."""

    mean_kl: float  # mean over positions of KL(reference || GGUF), nats
    min_top1_in_top5: float  # share of positions whose reference top-1 is in the GGUF's top 5
    max_logit_diff: float | None = None  # absolute, only where rounding does not dominate (f32)


#: Measured on the four tiny variants, merged and base + adapter GGUF (docs/verify.md, within 10x of the worst
#: right conversion): f32 KL 9.6e-7, |logit diff| 2.1e-2; f16 KL 5.5e-4; bf16 KL 2.9e-3; q8_0 KL 7.6e-3, top-1 in
#: top-5 97.3% (the 26B-A4B MoE at q8_0 measures 73% and fails: its experts do not survive 8-bit).
TOLERANCES: dict[str, Tolerance] = {
    "f32": Tolerance(mean_kl=5e-6, min_top1_in_top5=1.0, max_logit_diff=5e-2),
    "f16": Tolerance(mean_kl=1e-3, min_top1_in_top5=1.0),
    "bf16": Tolerance(mean_kl=1e-2, min_top1_in_top5=0.98),
    "q8_0": Tolerance(mean_kl=5e-2, min_top1_in_top5=0.95),
}


#: The text positions of image and audio prompts (f32 GGUF + mmproj; after the media their logits carry the
#: towers' rounding). Measured on tiny models with a text + tower LoRA merged, against the reference with the image
#: attention llama.cpp uses (docs/verify.md): max |logit diff| / mean KL 0.096-0.098 / 4.9e-5-9.7e-5 (E2B image),
#: 0.052-0.069 / 1.9e-5-2.4e-5 (E2B audio; 0.19 / 1.0e-4 with a text-only LoRA), 0.061-0.14 / 4.8e-5-1.9e-4 (31B
#: image; 0.23 with a text-only LoRA); every reference top-1 in llama.cpp's top 5. libmtmd's soft tokens are
#: 0.3-0.5% off transformers' (its towers' arithmetic), which lifts these over the text bound. Bounds: about 2x the
#: largest max |logit diff| and 5x the largest KL. The wrong image attention measures >= 1.7 / 0.023, an mmproj
#: without the vision LoRA delta >= 3.0 / 0.16.
MEDIA_TOLERANCES: dict[str, Tolerance] = {
    "f32": Tolerance(mean_kl=1e-3, min_top1_in_top5=1.0, max_logit_diff=0.5),
}
#: The processor's placeholder of each medium in the rendered verify prompts (replaced by libmtmd's marker).
PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>"}
#: libmtmd's media marker, put where the processor's placeholder was (``mtmd_default_marker``).
MEDIA_MARKER = "<__media__>"


def media_tolerance(gguf_type: str) -> Tolerance:
    """The bound for the text positions of image/audio prompts: measured for f32; for the other types the
    text bound of the type, its KL at least the f32 media bound (the towers' rounding comes on top)."""
    if gguf_type in MEDIA_TOLERANCES:
        return MEDIA_TOLERANCES[gguf_type]
    text = TOLERANCES[gguf_type]
    return Tolerance(mean_kl=max(text.mean_kl, MEDIA_TOLERANCES["f32"].mean_kl),
                     min_top1_in_top5=text.min_top1_in_top5)


def coarser(*types: str) -> str:
    """The lowest-precision GGUF type among ``types`` (its tolerance applies to their combination)."""
    return max(types, key=_ORDER.index)


# --------------------------------------------------------------------------- prompts and references


def default_prompts(model_dir: str | Path) -> list[list[int]]:
    """The verify prompts (``prompts.TEXT_PROMPTS``) rendered with the checkpoint's chat template, as token ids.

    They hold ``<bos>``, ``<|turn>`` and ``<turn|>`` and no multimodal placeholder.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for text in TEXT_PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        out.append(list(tokenizer(rendered, add_special_tokens=False).input_ids))
    return out


# --------------------------------------------------------------------------- running llama.cpp


def run_llamacpp(request: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, log: Log | None = None,
                 keep_dir: bool = False) -> dict[str, Any]:
    """Run ``llamacpp_runner.py`` with ``request``; return its result with each mode's logits loaded
    (``result["logits"][mode]``, float32 ``[positions, vocab]``). G4T911 without llama.cpp, G4T917
    when the runtime fails."""
    from gemma4_tune.engines.llamacpp_env import require_llamacpp
    from gemma4_tune.engines.vllm_env import engines_root

    log = log or _stderr
    install = require_llamacpp()
    runs = engines_root() / "scratch" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llamacpp-run-", dir=runs))
    (work / "request.json").write_text(json.dumps(request))
    result_path = work / "result.json"
    cmd = [install.python, "-P", str(RUNNER), str(work / "request.json"), str(result_path)]
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=60)
    try:
        proc = subprocess.run(cmd, cwd=work, env=install.runtime_environ(), capture_output=True, text=True,
                              timeout=timeout_s)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = -9, f"timed out after {timeout_s:.0f} s\n{exc.stderr or ''}"
    (work / "llama.cpp.log").write_text(output if isinstance(output, str) else output.decode("utf-8", "replace"))
    tail.extend(line for line in str(output).splitlines() if line.strip())
    for line in tail:
        if line.startswith("[llamacpp runner] "):
            log(f"[llama.cpp] {line[len('[llamacpp runner] '):]}")
    if rc != 0 or not result_path.exists():
        errors = [ln for ln in tail if "error" in ln.lower() or "failed" in ln.lower()]
        raise FindingError(finding(
            RUN_FAILED.code, f"llama.cpp (exit {rc}) could not run {request['model']}"
            + (f" with adapter {[m.get('adapter') for m in request.get('modes', []) if m.get('adapter')]}"
               if any(m.get("adapter") for m in request.get("modes", [])) else "")
            + ":\n" + "\n".join(errors[-3:] + list(tail)[-5:]) + f"\n(full log: {work / 'llama.cpp.log'})",
            "read the log for the first error: a GGUF from another converter release, missing tensors "
            "(re-export with `gemma4-tune export --gguf`), or an adapter converted for another base",
            log=str(work / "llama.cpp.log")))
    result = json.loads(result_path.read_text())
    result["logits"] = {mode: np.load(work / info["logits"]) for mode, info in result["modes"].items()
                        if info.get("logits")}
    result["mm_logits"] = {mode: np.load(work / info["mm_logits"]) for mode, info in result["modes"].items()
                           if info.get("mm_logits")}
    result.setdefault("timings", {})["wall_s"] = round(time.monotonic() - start, 3)
    if keep_dir:
        result["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- comparing


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(reference: Sequence[np.ndarray], got: np.ndarray, gguf_type: str,
                   tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Figures of one GGUF run against the reference, and whether they meet ``gguf_type``'s tolerance
    (or ``tolerance``: :func:`media_tolerance` for the text positions of image and audio prompts).

    ``reference``: per-prompt ``[len, vocab]`` arrays; ``got``: the runner's concatenated rows.
    """
    ref = np.concatenate([np.asarray(r, dtype=np.float32) for r in reference], axis=0)
    if ref.shape != got.shape:
        raise FindingError(finding(GGUF_PARITY_FAILED.code, f"llama.cpp returned logits of shape {got.shape}, the "
                                   f"reference has {ref.shape} (vocabulary or prompt length differs)",
                                   "the GGUF's vocabulary is not the checkpoint's: convert again from the same "
                                   "directory"))
    lr, lg = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    diff = np.abs(got.astype(np.float64) - ref).max(-1)
    top5 = np.argpartition(-got, 5, axis=-1)[:, :5]
    ref_top = ref.argmax(-1)
    in_top5 = (top5 == ref_top[:, None]).any(-1)
    agree = got.argmax(-1) == ref_top
    tol = tolerance or TOLERANCES[gguf_type]
    per_prompt, start = [], 0
    for r in reference:
        n = len(r)
        sl = slice(start, start + n)
        per_prompt.append({"positions": n, "max_logit_diff": float(diff[sl].max()), "mean_kl": float(kl[sl].mean()),
                           "greedy_agreement": float(agree[sl].mean()), "top1_in_top5": float(in_top5[sl].mean())})
        start += n
    figures = {
        "gguf_type": gguf_type, "positions": int(len(ref)), "max_logit_diff": float(diff.max()),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "greedy_agreement": float(agree.mean()),
        "top1_in_top5": float(in_top5.mean()), "reference_max_abs_logit": float(np.abs(ref).max()),
        "tolerance": asdict(tol), "per_prompt": per_prompt,
    }
    figures["non_finite"] = int((~np.isfinite(got)).sum())
    figures["values"] = int(got.size)
    failures = []  # written so that a NaN figure fails: NaN compares false with every bound
    if figures["non_finite"]:
        failures.append(f"{figures['non_finite']} of {got.size} logits are NaN or infinite")
    if tol.max_logit_diff is not None and not figures["max_logit_diff"] <= tol.max_logit_diff:
        failures.append(f"max |logit diff| {figures['max_logit_diff']:.3g} > {tol.max_logit_diff:g}")
    if not figures["mean_kl"] <= tol.mean_kl:
        failures.append(f"mean KL {figures['mean_kl']:.3g} > {tol.mean_kl:g}")
    if not figures["top1_in_top5"] >= tol.min_top1_in_top5:
        failures.append(f"reference top-1 in llama.cpp's top 5 at {figures['top1_in_top5']:.1%} of positions "
                        f"(< {tol.min_top1_in_top5:.0%})")
    figures["failures"] = failures
    figures["ok"] = not failures
    return figures


def _parity_finding(what: str, figures: dict[str, Any], fix: str) -> Finding:
    from gemma4_tune.verify.verdict import non_finite_finding

    if figures.get("non_finite"):  # the cause: the NaN figures it makes are not a second finding
        return non_finite_finding(f"{what} in llama.cpp", figures["non_finite"], figures["values"],
                                  "the GGUF holds NaN or infinite weights (a broken merge or conversion): merge and "
                                  "convert again with `gemma4-tune export --merged DIR --gguf GGUF_DIR`")
    return finding(GGUF_PARITY_FAILED.code, f"{what} in llama.cpp differs from transformers: "
                   + "; ".join(figures["failures"]) + f" (greedy agreement {figures['greedy_agreement']:.1%}, "
                   f"{figures['gguf_type']})", fix, **{k: figures[k] for k in ("max_logit_diff", "mean_kl",
                                                                                 "top1_in_top5")})


# --------------------------------------------------------------------------- entry point


def _files(gguf: str | Path | dict[str, str | Path]) -> tuple[dict[str, Path], dict[str, Any]]:
    from gemma4_tune.export.gguf import GGUF_RECORD

    if isinstance(gguf, dict):
        return {k: Path(v) for k, v in gguf.items() if v}, {}
    path = Path(gguf)
    if path.is_file():
        return {"model": path}, {}
    record = json.loads((path / GGUF_RECORD).read_text()) if (path / GGUF_RECORD).is_file() else {}
    files = {k: path / v for k, v in (record.get("files") or {}).items()}
    if not files:
        files = {kind: p for kind in ("model", "mmproj", "base", "adapter")
                 for p in sorted(path.glob(f"{kind}-*.gguf"))[:1]}
    return files, record


def _type_of(path: Path) -> str | None:
    stem = path.stem
    return next((t for t in _ORDER if stem.endswith(f"-{t}")), None)


def _token_flags(tokens: dict[str, Any], tok: Any) -> tuple[dict[str, Any], list[Finding]]:
    out: dict[str, Any] = {}
    findings: list[Finding] = []
    for text, need in zip(TURN_TOKENS, (("control",), ("control", "eog")), strict=True):
        tid = tok.convert_tokens_to_ids(text)
        flags = tokens.get(str(tid)) or {}
        out[text] = {"id": tid, **flags}
        missing = [n for n in need if not flags.get(n)]
        if missing:
            findings.append(finding(
                GGUF_PARITY_FAILED.code, f"the GGUF vocabulary does not mark {text} (id {tid}) as "
                f"{' and '.join('end-of-generation' if m == 'eog' else m for m in missing)}: llama.cpp would "
                + ("not stop at the end of the model's turn" if "eog" in missing else "split or print it as text"),
                "declare the Gemma 4 named tokens (sot_token, eot_token, ...) as special tokens in "
                "tokenizer_config.json, as the official tokenizer does, and convert again", severity=Severity.WARNING))
    return out, findings


def verify_gguf(gguf: str | Path | dict[str, str | Path], reference: str | Path | Sequence[np.ndarray] | None = None,
                prompts: Sequence[Sequence[int]] | None = None, gguf_type: str | None = None, *,
                adapter_reference: dict[str, Sequence[np.ndarray]] | None = None,
                base_dir: str | Path | None = None, adapter_dir: str | Path | None = None,
                base_reference: Sequence[np.ndarray] | None = None,
                n_threads: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                log: Log | None = None, media: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the GGUF export in llama.cpp and compare it with transformers; return figures and findings.

    ``gguf``: an :func:`~gemma4_tune.export.gguf.export_gguf` directory (its record names the files,
    type, merged/base/adapter directories), one ``.gguf`` file, or ``{"model": ..., "mmproj": ...,
    "base": ..., "adapter": ...}``. ``reference``: the merged checkpoint directory (default: the
    record's) or precomputed per-prompt logits for ``model``. ``prompts``: token ids (default:
    :func:`default_prompts`). ``base_reference``: the base model's logits; with it the model's figures
    get ``adapter_effect`` (max |GGUF - base|). ``adapter_reference``: precomputed
    ``reference.token_logits(base_dir, adapter_dir, prompts)``; otherwise computed from
    ``base_dir``/``adapter_dir`` (default: the record's). ``n_threads``: llama.cpp's
    threads (default: the CPU count, at most 8). ``media``: runner request keys for prompts with images or
    audio (:func:`media_request`), run in the same llama.cpp process as ``model``; what libmtmd made of them
    and their logits come back as ``out["media"]`` (compared by :func:`engine_results`). Parity problems
    come back as findings (G4T915, G4T611) with ``ok`` False; G4T911/G4T917 are raised.
    """
    log = log or _stderr
    n_threads = n_threads or min(os.cpu_count() or 1, 8)
    files, record = _files(gguf)
    gguf_type = gguf_type or record.get("gguf_type") or _type_of(files.get("model") or files.get("base") or Path())
    if gguf_type not in TOLERANCES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}: pass gguf_type (one of {', '.join(TOLERANCES)})")
    ref_dir = Path(reference) if isinstance(reference, (str, Path)) else (
        Path(record["merged"]) if record.get("merged") else None)
    base_dir = Path(base_dir) if base_dir else (Path(record["base"]) if record.get("base") else None)
    adapter_dir = Path(adapter_dir) if adapter_dir else (Path(record["adapter"]) if record.get("adapter") else None)
    tokenizer_dir = ref_dir or base_dir
    if prompts is None:
        if tokenizer_dir is None:
            raise ValueError("give prompts (token ids) or a reference checkpoint directory to render them")
        prompts = default_prompts(tokenizer_dir)
    prompts = [[int(t) for t in p] for p in prompts]
    out: dict[str, Any] = {"gguf_type": gguf_type, "files": {k: str(v) for k, v in files.items()},
                           "prompts": len(prompts), "positions": sum(map(len, prompts)), "timings": {}}
    findings: list[Finding] = []

    if "model" in files:
        tok = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        request: dict[str, Any] = {"model": str(files["model"]), "prompts": prompts, "n_threads": n_threads,
                                   "check_token_ids": [tok.convert_tokens_to_ids(t) for t in TURN_TOKENS] if tok
                                   else []}
        if "mmproj" in files:
            request["mmproj"] = str(files["mmproj"])
            request.update(media or {})
        log(f"[llama.cpp] running {files['model'].name}" + (f" + {files['mmproj'].name}" if "mmproj" in files else ""))
        result = run_llamacpp(request, timeout_s=timeout_s, log=log)
        out["llama_cpp_build"] = result.get("llama_cpp_build")
        out["chat_template"] = result.get("chat_template")  # what the GGUF's tokenizer.chat_template holds
        if media and "mmproj" in files:
            out["media"] = {"mm_prompts": result.get("mm_prompts") or [],
                            "layout_prompts": result.get("layout_prompts") or [],
                            "logits": result["mm_logits"].get("base"), "mmproj": result.get("mmproj")}
        start = time.monotonic()
        if reference is None or isinstance(reference, (str, Path)):
            if ref_dir is None:
                raise ValueError("no reference: pass the merged checkpoint directory or precomputed logits")
            log(f"[llama.cpp] computing the transformers reference from {ref_dir} (CPU, float32)")
            ref_rows: Sequence[np.ndarray] = token_logits(ref_dir, None, prompts)["base"]
        else:
            ref_rows = reference
        out["timings"]["reference_s"] = round(time.monotonic() - start, 3)
        out["timings"]["model_run_s"] = result["timings"].get("wall_s")
        figures = compare_logits(ref_rows, result["logits"]["base"], gguf_type)
        if base_reference is not None:
            base_rows = np.concatenate([np.asarray(r, np.float64) for r in base_reference])
            figures["adapter_effect"] = float(np.abs(result["logits"]["base"].astype(np.float64) - base_rows).max())
        out["model"] = figures
        log(f"[llama.cpp] {files['model'].name}: max |logit diff| {figures['max_logit_diff']:.2e}, mean KL "
            f"{figures['mean_kl']:.1e}, greedy agreement {figures['greedy_agreement']:.1%}, top-1 in top-5 "
            f"{figures['top1_in_top5']:.1%} ({'ok' if figures['ok'] else 'FAILED'})")
        if not figures["ok"]:
            findings.append(_parity_finding(files["model"].name, figures, "convert again from the merged checkpoint "
                                            "with `gemma4-tune export --gguf`; if it persists, use a higher-precision "
                                            "--gguf-type"))
        if tok is not None:
            out["vocab"], vocab_findings = _token_flags(result["vocab"]["tokens"], tok)
            findings += vocab_findings
        if "mmproj" in files:
            config = json.loads((tokenizer_dir / "config.json").read_text()) if tokenizer_dir else {}
            mm = dict(result.get("mmproj") or {})
            mm["expected_vision"] = bool(config.get("vision_config"))
            mm["expected_audio"] = bool(config.get("audio_config"))
            out["mmproj"] = mm
            if tokenizer_dir and (mm.get("vision") != mm["expected_vision"] or mm.get("audio") != mm["expected_audio"]):
                findings.append(finding(GGUF_PARITY_FAILED.code, f"{files['mmproj'].name} loads in libmtmd with vision="
                                        f"{mm.get('vision')} audio={mm.get('audio')}, the checkpoint has vision="
                                        f"{mm['expected_vision']} audio={mm['expected_audio']}",
                                        "convert the towers again with `gemma4-tune export --gguf` from the merged "
                                        "checkpoint"))

    if "base" in files and "adapter" in files:
        adapter_type = _type_of(files["adapter"]) or gguf_type
        combo = coarser(gguf_type, _type_of(files["base"]) or gguf_type, adapter_type)
        request = {"model": str(files["base"]), "prompts": prompts, "n_threads": n_threads,
                   "modes": [{"name": "base"}, {"name": "adapter", "adapter": str(files["adapter"])}]}
        log(f"[llama.cpp] running {files['base'].name} without and with {files['adapter'].name}")
        result = run_llamacpp(request, timeout_s=timeout_s, log=log)
        out["llama_cpp_build"] = result.get("llama_cpp_build")
        start = time.monotonic()
        if adapter_reference is None:
            if base_dir is None or adapter_dir is None:
                raise ValueError("no adapter reference: pass base_dir and adapter_dir (or adapter_reference)")
            log(f"[llama.cpp] computing the transformers + PEFT reference ({base_dir} + {adapter_dir})")
            adapter_reference = token_logits(base_dir, adapter_dir, prompts)
        out["timings"]["adapter_reference_s"] = round(time.monotonic() - start, 3)
        out["timings"]["adapter_run_s"] = result["timings"].get("wall_s")
        base_fig = compare_logits(adapter_reference["base"], result["logits"]["base"], combo)
        lora_fig = compare_logits(adapter_reference["tuned"], result["logits"]["adapter"], combo)
        effect = float(np.abs(result["logits"]["adapter"].astype(np.float64) - result["logits"]["base"]).max())
        ref_effect = float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                               for a, b in zip(adapter_reference["tuned"], adapter_reference["base"], strict=True)))
        threshold = max(MIN_EFFECT, MIN_EFFECT_SHARE * ref_effect)
        out["adapter"] = {"base": base_fig, "adapter": lora_fig, "adapter_effect": effect,
                          "reference_effect": ref_effect, "min_effect": threshold, "tolerance_type": combo}
        log(f"[llama.cpp] {files['adapter'].name}: max |logit diff| {lora_fig['max_logit_diff']:.2e}, mean KL "
            f"{lora_fig['mean_kl']:.1e}, greedy agreement {lora_fig['greedy_agreement']:.1%}; adapter effect "
            f"{effect:.3g} (reference {ref_effect:.3g})")
        if not base_fig["ok"]:
            findings.append(_parity_finding(files["base"].name, base_fig, "convert the base again from the local base "
                                            "checkpoint the adapter was trained on"))
        if not effect >= threshold and not lora_fig["non_finite"]:
            findings.append(finding(NO_EFFECT_IN_ENGINE.code, f"llama.cpp: {files['adapter'].name} moves the logits "
                                    f"by at most {effect:.3g} (transformers + PEFT: {ref_effect:.3g}, at least "
                                    f"{threshold:.3g} expected): the adapter GGUF changes (almost) nothing",
                                    "check that lora_B is not all zeros and that the adapter GGUF was converted from "
                                    "this adapter (convert_lora_to_gguf.py drops modules it cannot map); or serve "
                                    "the merged GGUF", adapter_effect=effect, reference_effect=ref_effect))
        elif not lora_fig["ok"]:
            findings.append(_parity_finding(f"{files['base'].name} + {files['adapter'].name}", lora_fig,
                                            "serve the merged GGUF (model-<T>.gguf) instead; an adapter GGUF loses "
                                            "what convert_lora_to_gguf.py cannot map"))
    if "model" not in files and not ("base" in files and "adapter" in files):
        from gemma4_tune.verify.verdict import NOTHING_COMPARED

        findings.append(finding(NOTHING_COMPARED.code, f"{gguf}: no model-<type>.gguf, nor a base-<type>.gguf with "
                                "an adapter-<type>.gguf, was recognised: nothing was compared",
                                "pass an `export --gguf` directory, or those .gguf files"))
    out["findings"] = findings
    out["ok"] = not any(f.severity is Severity.ERROR for f in findings)
    return out


# --------------------------------------------------------------------------- image and audio prompts


def processor_pixels(processor: Any, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(image, same)``: the image resized as Gemma 4's processor resizes it (the pixels its tower sees:
    an aspect-preserving size, each side a multiple of patch x pooling, within ``max_soft_tokens``), and
    whether the processor makes exactly the same ``pixel_values`` of it as of the original. libmtmd is given
    these pixels, so both sides encode the same image; how libmtmd would size the original itself is
    checked on its own (:func:`media_request`'s layout prompts)."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as tvf
    from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

    ip = processor.image_processor
    height, width = get_aspect_ratio_preserving_size(pixels.shape[0], pixels.shape[1], ip.patch_size,
                                                     ip.max_soft_tokens * ip.pooling_kernel_size ** 2,
                                                     ip.pooling_kernel_size)
    if (height, width) == tuple(pixels.shape[:2]):
        return pixels, True
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
    resized = tvf.resize(chw, size=[height, width], interpolation=tvf.InterpolationMode.BICUBIC, antialias=True)
    resized = resized.permute(1, 2, 0).contiguous().numpy()
    ours = ip([[Image.fromarray(resized)]], return_tensors="pt")["pixel_values"]
    theirs = ip([[Image.fromarray(pixels)]], return_tensors="pt")["pixel_values"]
    same = bool(ours.shape == theirs.shape and torch.equal(ours, theirs))
    return (resized, True) if same else (pixels, False)


def media_request(processor: Any, groups: dict[str, list[Any]], work: Path) -> dict[str, Any]:
    """Runner request keys for the image/audio verification prompts (``verify.prompts``) in ``groups``.

    Each prompt's processor placeholder becomes libmtmd's marker; images are written as raw RGB at the
    processor's size (:func:`processor_pixels`), audio as raw float32 at 16 kHz. libmtmd gets the
    processor's image budget (``image_max_tokens`` = ``max_soft_tokens``, ``image_min_tokens`` 1, so it
    keeps those pixels as they are). The original images go again as ``layout_prompts``, tokenized only
    under ``--image-max-tokens`` alone: how llama.cpp itself lays out a user's image.
    """
    work.mkdir(parents=True, exist_ok=True)
    budget = int(processor.image_processor.max_soft_tokens) if "image" in groups else 0
    mm, layout, index = [], [], []
    for modality, group in groups.items():
        for k, prompt in enumerate(group):
            text, media, originals = prompt.text.replace(PLACEHOLDERS[modality], MEDIA_MARKER), [], []
            for j, pixels in enumerate(prompt.images):
                sized, same = processor_pixels(processor, pixels)
                for what, arr in (("rgb", sized), ("original", pixels)):
                    path = work / f"{prompt.name}-{j}-{what}.rgb"
                    np.ascontiguousarray(arr, dtype=np.uint8).tofile(path)
                    item = {"kind": "image", "rgb": str(path), "width": int(arr.shape[1]), "height": int(arr.shape[0])}
                    (media if what == "rgb" else originals).append({**item, "processor_pixels": same})
            for j, clip in enumerate(prompt.audios):
                path = work / f"{prompt.name}-{j}.f32"
                np.ascontiguousarray(clip, dtype=np.float32).tofile(path)
                media.append({"kind": "audio", "f32": str(path)})
            mm.append({"text": text, "media": media})
            if originals:
                layout.append({"text": text, "media": originals})
            index.append((modality, k))
    request: dict[str, Any] = {"mm_prompts": mm, "media_marker": MEDIA_MARKER, "mm_index": index}
    if budget:
        request.update(image_min_tokens=1, image_max_tokens=budget, layout_prompts=layout,
                       layout_params={"image_max_tokens": budget})
    return request


def _chunk_text(chunks: list[dict[str, Any]]) -> str:
    return " + ".join(f"{len(c['tokens'])} text" if c["type"] == "text" else f"{c['n_tokens']} {c['type']}"
                      for c in chunks)


def align(ids: Sequence[int], types: Sequence[int], chunks: list[dict[str, Any]]) -> tuple[list[int], str | None]:
    """``(text positions, problem)``: where the processor's tokens (``ids``, ``mm_token_type_ids`` ``types``,
    padding removed) hold libmtmd's chunks. Text chunks must be the same token ids at text positions (the
    begin/end-of-media tokens are text in both), each media chunk as many positions as the processor's run of
    soft tokens at that place. ``problem`` says where they part (with both counts)."""
    pos, text = 0, []
    for n, chunk in enumerate(chunks):
        if chunk["type"] == "text":
            toks = list(chunk["tokens"])
            hf = list(ids[pos:pos + len(toks)])
            if hf != toks or any(types[pos:pos + len(toks)]):
                return text, (f"text chunk {n} of libmtmd ({len(toks)} tokens {toks[:8]}...) is not the processor's "
                              f"tokens at position {pos} ({hf[:8]}...)")
            text += range(pos, pos + len(toks))
            pos += len(toks)
        else:
            run = 0
            while pos + run < len(ids) and types[pos + run]:
                run += 1
            if run != chunk["n_tokens"]:
                return text, (f"libmtmd lays the {chunk['type']} out as {chunk['n_tokens']} soft tokens where "
                              f"transformers' processor makes {run} (position {pos})")
            pos += run
    if pos != len(ids):
        return text, f"libmtmd's chunks ({_chunk_text(chunks)}) cover {pos} of the processor's {len(ids)} tokens"
    return text, None


def _not_run_row(name: str, modality: str, reason: str, build: str | None) -> Any:
    """A row for a modality llama.cpp did not run: a G4T920 warning, nothing compared (0 prompts, 0 positions)
    and ``not_run`` set, so it reads "not run", never "pass" (and ``require_comparisons`` leaves it be)."""
    from gemma4_tune.verify.verdict import EngineResult

    what = f"llama.cpp {build or '(unknown build)'} cannot run the {modality} prompts"
    tower = "vision tower on video" if modality == "video" else f"{modality} tower"
    f = finding(MODALITY_NOT_RUN.code, f"{name}: {what}: {reason}; the {tower} is not verified in llama.cpp",
                f"verify the {modality} tower with another engine (--engine transformers or vllm); a llama.cpp build "
                f"whose libmtmd runs Gemma 4 {modality} input lets `verify --engine llama.cpp` check it",
                llama_cpp_build=build, modality=modality, reason=reason)
    return EngineResult(name, float("nan"), 0.0, 0.0, float("nan"), [f], criterion="not run", prompts=0, positions=0,
                        modalities=[modality], not_run=f"{what}: {reason}")


def media_rows(name: str, groups: dict[str, list[Any]], batches: dict[str, dict[str, Any]],
               references: dict[str, dict[str, Any]], media: dict[str, Any] | None, request: dict[str, Any],
               gguf_type: str, build: str | None, *,
               alternative: Callable[[str], dict[str, Any]] | None = None,
               bidirectional_reference: bool = False) -> list[Any]:
    """One row per media modality: llama.cpp's logits at the text positions of its image/audio prompts against
    the reference (``references["tuned"][modality]``), the adapter effect against ``references["base"]``.

    ``alternative(modality)``: the reference with the other image-token attention (called only when image rows
    fail): when llama.cpp matches that one, the finding is G4T921 and names the attention each side uses.
    """
    rows = []
    records = list((media or {}).get("mm_prompts") or [])
    logits = (media or {}).get("logits")
    offsets, start = [], 0
    for record in records:
        offsets.append(start)
        start += 0 if record["error"] else int(record["text_positions"])
    index = [tuple(i) for i in request.get("mm_index", [])]
    layouts = list((media or {}).get("layout_prompts") or [])
    for modality, group in groups.items():
        if media is None:
            rows.append(_not_run_row(name, modality, "no mmproj-*.gguf beside the model, so libmtmd has no towers",
                                     build))
            continue
        mine = [i for i, (m, _) in enumerate(index) if m == modality]
        batch, findings = batches[modality], []
        errors = [(group[index[i][1]].name, records[i]["error"]) for i in mine if records[i]["error"]]
        ok_prompts = [i for i in mine if not records[i]["error"]]
        if not ok_prompts:
            rows.append(_not_run_row(name, modality, "; ".join(f"{n}: {e}" for n, e in errors), build))
            continue
        if errors:
            findings.append(finding(MODALITY_NOT_RUN.code, f"{name}: llama.cpp {build} could not run "
                                    + ", ".join(f"{n} ({e})" for n, e in errors), "see the reason; the other "
                                    f"{modality} prompts were compared", llama_cpp_build=build, modality=modality))
        ref_rows, base_rows, got_rows, compared = [], [], [], []
        for i in ok_prompts:
            k = index[i][1]
            mask = batch["attention_mask"][k].bool()
            ids = batch["input_ids"][k][mask].tolist()
            types = batch["mm_token_type_ids"][k][mask].tolist()
            text, problem = align(ids, types, records[i]["chunks"])
            if problem:
                findings.append(finding(GGUF_PARITY_FAILED.code, f"{name}, {group[k].name}: llama.cpp {build} lays the "
                                        f"prompt out unlike transformers: {problem}; nothing of it was compared",
                                        "the projector's image/audio settings differ from the processor's "
                                        "(processor_config.json): convert the towers again with `gemma4-tune export "
                                        "--gguf`, or report it with verify.json", layout=records[i]["chunks"]))
                continue
            got = logits[offsets[i]:offsets[i] + len(text)]
            ref_rows.append(references["tuned"][modality][k][mask][text].float().numpy())
            base_rows.append(references["base"][modality][k][mask][text].float().numpy())
            got_rows.append(got)
            compared.append((k, mask, text))
        for k, lay in enumerate(layouts if modality == "image" else []):  # how llama.cpp sizes a user's image
            if lay["error"] or k >= len(group):
                continue
            mask = batch["attention_mask"][k].bool()
            mtmd_n = [c["n_tokens"] for c in lay["chunks"] or [] if c["type"] == "image"]
            hf_n = int((batch["mm_token_type_ids"][k][mask] != 0).sum())
            if sum(mtmd_n) != hf_n:
                findings.append(finding(IMAGE_SIZED_OTHERWISE.code, f"{name}, {group[k].name}: libmtmd ({build}, "
                                        f"--image-max-tokens {request.get('image_max_tokens')}) sizes the "
                                        f"{group[k].images[0].shape[0]}x{group[k].images[0].shape[1]} (HxW) image to "
                                        f"{sum(mtmd_n)} soft tokens where transformers' processor makes {hf_n}: a "
                                        "user's image reaches the model with other pixels in llama.cpp (the "
                                        "comparison gave libmtmd the processor's pixels)",
                                        "send llama.cpp images already at the processor's size (each side a multiple "
                                        "of patch_size x pooling_kernel_size, within max_soft_tokens) so both "
                                        "sides see the same pixels", mtmd_tokens=sum(mtmd_n), processor_tokens=hf_n))
        if not compared:
            rows.append(_row(name, None, 0.0, findings, prompts=0, positions=0, modalities=[modality],
                             tolerance=media_tolerance(gguf_type)))
            continue
        got_all = np.concatenate(got_rows, axis=0)
        figures = compare_logits(ref_rows, got_all, gguf_type, media_tolerance(gguf_type))
        effect = float(np.abs(got_all.astype(np.float64) - np.concatenate(base_rows).astype(np.float64)).max())
        ref_effect = float(max(np.abs(a.astype(np.float64) - b).max() for a, b in zip(ref_rows, base_rows,
                                                                                      strict=True)))
        figures.update(adapter_effect=effect, reference_effect=ref_effect,
                       non_causal=[c.get("non_causal") for i in ok_prompts for c in records[i]["chunks"]
                                   if c["type"] != "text"])
        if not figures["ok"]:
            findings.append(_media_parity_finding(name, modality, figures, got_all, gguf_type, build,
                                                  compared, alternative, bidirectional_reference))
        threshold = max(MIN_EFFECT, MIN_EFFECT_SHARE * ref_effect)
        if not effect >= threshold and not figures["non_finite"]:
            findings.append(finding(NO_EFFECT_IN_ENGINE.code, f"llama.cpp: {name} on {modality} prompts differs from "
                                    f"the base model by at most {effect:.3g} (transformers + PEFT: {ref_effect:.3g}): "
                                    "the merged GGUF does not carry the fine-tune", "merge again with `gemma4-tune "
                                    "export --merged` and convert that checkpoint", adapter_effect=effect,
                                    reference_effect=ref_effect))
        rows.append(_row(name, figures, effect, findings, prompts=len(compared), positions=figures["positions"],
                         modalities=[modality]))
    return rows


def _media_parity_finding(name: str, modality: str, figures: dict[str, Any], got: np.ndarray, gguf_type: str,
                          build: str | None, compared: list[tuple[int, Any, list[int]]],
                          alternative: Callable[[str], dict[str, Any]] | None,
                          bidirectional_reference: bool) -> Finding:
    """G4T915 for a failed image/audio row, or G4T921 when llama.cpp matches the other image-token attention."""
    what = f"{name} on {modality} prompts"
    if modality != "image" or alternative is None or figures.get("non_finite"):
        return _parity_finding(what, figures, "convert the towers again from the merged checkpoint with "
                               "`gemma4-tune export --gguf`; if it persists, use a higher-precision --gguf-type")
    other = alternative(modality)
    alt_rows = [other["tuned"][modality][k][mask][text].float().numpy() for k, mask, text in compared]
    alt = compare_logits(alt_rows, got, gguf_type, media_tolerance(gguf_type))
    figures["other_attention"] = {k: alt[k] for k in ("max_logit_diff", "mean_kl", "top1_in_top5", "ok")}
    ours, theirs = attention_name(not bidirectional_reference), attention_name(bidirectional_reference)
    mtmd = ("libmtmd decodes these image chunks non-causally (mtmd_decode_use_non_causal)"
            if all(figures.get("non_causal") or [False]) else "libmtmd decodes these image chunks causally")
    if alt["ok"]:
        return finding(IMAGE_ATTENTION_DIFFERS.code,
                       f"{what}: llama.cpp {build} attends image tokens {ours}ly where transformers attends them "
                       f"{theirs}ly: against transformers max |logit diff| {figures['max_logit_diff']:.3g}, mean KL "
                       f"{figures['mean_kl']:.2g}; against transformers with {ours} image attention "
                       f"{alt['max_logit_diff']:.3g} and {alt['mean_kl']:.2g}, within the tolerance ({mtmd})",
                       "this llama.cpp build runs the model's image tokens with the wrong attention (llama.cpp#28318 "
                       "for E2B/E4B): do not serve image prompts of this model with it; use a llama.cpp build that "
                       "decodes them as the model's config says (text_config.use_bidirectional_attention), or serve "
                       "images with transformers or vLLM. Text prompts are not affected",
                       llama_cpp_build=build, llama_cpp_attention=ours, transformers_attention=theirs,
                       max_logit_diff=figures["max_logit_diff"], mean_kl=figures["mean_kl"],
                       other_max_logit_diff=alt["max_logit_diff"], other_mean_kl=alt["mean_kl"])
    f = _parity_finding(what, figures, "convert the towers again from the merged checkpoint with `gemma4-tune "
                        "export --gguf`; if it persists, use a higher-precision --gguf-type")
    f.message += (f"; with {ours} image attention transformers differs as much (max |logit diff| "
                  f"{alt['max_logit_diff']:.3g}, mean KL {alt['mean_kl']:.2g}): not an attention difference ({mtmd})")
    return f


# --------------------------------------------------------------------------- entry point: verify --engine llama.cpp


def engine_results(base: str | Path, adapter: str | Path, gguf_dir: str | Path, *, log: Log | None = None,
                   flip_image_attention: bool = False) -> list[Any]:
    """``verify --engine llama.cpp``: each GGUF of an export directory against the trained model, per modality.

    The reference is base + adapter in PEFT (float32, CPU), as for every other engine. Rows (``EngineResult``,
    ``modalities`` one element):

    - ``llama.cpp model-<T>.gguf``, text: the text verify prompts (token ids), as before;
    - ``llama.cpp model-<T>.gguf``, image / audio, where the model has the tower: the verification prompts of
      ``verify.prompts`` run through libmtmd with the ``mmproj`` (:func:`media_request`), compared at every
      text position (before and after the media) with ``reference.logits_by_modality``'s ``"tuned"``, within
      :func:`media_tolerance`; the chunk layout must be the processor's (G4T915); image rows that fail are
      diagnosed against the other image-token attention (G4T921). A modality libmtmd cannot run is a G4T920
      warning row with 0 prompts;
    - ``llama.cpp base-<T>.gguf + adapter-<T>``, text, where the export wrote them.

    Each compared row must show that the fine-tune changes llama.cpp's output against the base (G4T611, row 4).
    ``flip_image_attention``: compute the reference with the image-token attention the model does not use (a
    check of the check: the image rows must then fail).
    """
    from transformers import AutoProcessor

    from gemma4_tune.verify.prompts import by_modality, processed, verification_prompts

    log = log or _stderr
    files, record = _files(gguf_dir)
    gguf_type = record.get("gguf_type") or _type_of(files.get("model") or files.get("base") or Path())
    if "model" not in files:
        raise FindingError(finding(RUN_FAILED.code, f"{gguf_dir} holds no model-<type>.gguf",
                                   "export it with `gemma4-tune export --merged DIR --gguf GGUF_DIR`"))
    from gemma4_tune.export.manifest import read_manifest, template_findings

    prompts = default_prompts(base)
    log(f"[llama.cpp] computing the transformers + PEFT reference ({base} + {adapter})")
    reference = token_logits(base, adapter, prompts)
    processor = AutoProcessor.from_pretrained(str(base))
    verified = by_modality(verification_prompts(base, processor, adapter))
    groups = {m: g for m, g in verified.items() if m not in ("text", "video")}
    results = []
    merged = {k: files[k] for k in ("model", "mmproj") if k in files}
    from gemma4_tune.engines.vllm_env import engines_root

    scratch = engines_root() / "scratch" / "media"
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llamacpp-media-", dir=scratch))
    try:
        media_req = media_request(processor, groups, work) if groups and "mmproj" in files else {}
        report = verify_gguf(merged, reference["tuned"], prompts, gguf_type, base_dir=base,
                             base_reference=reference["base"], log=log, media=media_req or None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    effect = float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                       for a, b in zip(reference["tuned"], reference["base"], strict=True)))
    ours = report["model"]["adapter_effect"]
    findings = list(report["findings"])
    findings += template_findings(adapter, files["model"].name, report.get("chat_template"), read_manifest(adapter),
                                  "export the GGUF again from a merged checkpoint that has the {trained} template "
                                  "(`gemma4-tune export --merged DIR --gguf GGUF_DIR` copies it into the GGUF)")
    threshold = max(MIN_EFFECT, MIN_EFFECT_SHARE * effect)
    if not ours >= threshold and not report["model"]["non_finite"]:
        findings.append(finding(NO_EFFECT_IN_ENGINE.code, f"llama.cpp: {files['model'].name} differs from the base "
                                f"model by at most {ours:.3g} (transformers + PEFT: {effect:.3g}): the merged GGUF "
                                "does not carry the fine-tune", "merge again with `gemma4-tune export --merged` and "
                                "convert that checkpoint", adapter_effect=ours, reference_effect=effect))
    name = f"llama.cpp {files['model'].name}"
    results.append(_row(name, report["model"], ours, findings, prompts=int(report.get("prompts", 0)),
                        positions=int(report.get("positions", 0)), modalities=["text"]))
    if groups and report.get("media") is None:  # no projector: nothing of the towers can run
        results += media_rows(name, groups, {}, {}, None, {}, gguf_type, report.get("llama_cpp_build"))
    elif groups:
        batches = {m: processed(processor, g) for m, g in groups.items()}
        log(f"[llama.cpp] computing the transformers + PEFT reference on {', '.join(groups)} prompts")
        refs = logits_by_modality(base, adapter, batches, flip_image_attention=flip_image_attention)
        bidirectional = bidirectional_vision(base) != flip_image_attention

        def alternative(modality: str) -> dict[str, Any]:
            log(f"[llama.cpp] {modality} rows failed: computing the reference with the other image-token attention")
            return logits_by_modality(base, adapter, {modality: batches[modality]},
                                      flip_image_attention=not flip_image_attention)

        rows = media_rows(name, groups, batches, refs, report.get("media"), media_req, gguf_type,
                          report.get("llama_cpp_build"), alternative=alternative, bidirectional_reference=bidirectional)
        for row in rows:
            fig = getattr(row, "figures", None) or {}
            log(f"[llama.cpp] {name} {row.modalities[0]}: {row.compared}, max |logit diff| {row.max_logit_diff:.3g}"
                + (f", mean KL {fig['mean_kl']:.2g}, adapter effect {row.adapter_effect:.3g} (transformers + PEFT: "
                   f"{fig['reference_effect']:.3g})" if fig else "")
                + f" ({'ok' if row.ok else 'FAILED'}" + "".join(f"; {f.code}" for f in row.findings) + ")")
        results += rows
    if "video" in verified:
        results.append(_not_run_row(name, "video", VIDEO_NOT_RUN, report.get("llama_cpp_build")))
    if "base" in files and "adapter" in files:
        pair = {k: files[k] for k in ("base", "adapter")}
        report = verify_gguf(pair, prompts=prompts, gguf_type=gguf_type, adapter_reference=reference,
                             base_dir=base, adapter_dir=adapter, log=log)
        figures = report["adapter"]
        results.append(_row(f"llama.cpp {files['base'].name} + {files['adapter'].stem}", figures["adapter"],
                            figures["adapter_effect"], list(report["findings"]), prompts=int(report.get("prompts", 0)),
                            positions=int(report.get("positions", 0)), modalities=["text"]))
    return results


def _row(name: str, figures: dict[str, Any] | None, effect: float, findings: list[Finding], *, prompts: int,
         positions: int, modalities: list[str], tolerance: Tolerance | None = None) -> Any:
    """An ``EngineResult`` row of compared ``figures`` (:func:`compare_logits`; ``None``: nothing compared, with
    ``tolerance`` the bound it would have had), with the figures kept on the row."""
    from gemma4_tune.verify.verdict import EngineResult

    tol = figures["tolerance"] if figures else asdict(tolerance or TOLERANCES["f32"])
    rule = f"KL {tol['mean_kl']:.0e}, top-5 {tol['min_top1_in_top5']:.0%}"
    if tol["max_logit_diff"]:
        rule = f"{tol['max_logit_diff']:.0e}; {rule}"
    return EngineResult(name, figures["max_logit_diff"] if figures else float("nan"),
                        figures["greedy_agreement"] if figures else 0.0, effect,
                        float(tol["max_logit_diff"] or "nan"), findings, criterion=rule, prompts=prompts,
                        positions=positions, modalities=list(modalities), figures=dict(figures or {}))


__all__ = ["GGUF_PARITY_FAILED", "IMAGE_ATTENTION_DIFFERS", "MEDIA_TOLERANCES", "MODALITY_NOT_RUN", "RUN_FAILED",
           "TOLERANCES", "Tolerance", "align", "coarser", "compare_logits", "default_prompts", "engine_results",
           "media_request", "media_rows", "media_tolerance", "processor_pixels",
           "run_llamacpp", "verify_gguf"]
