"""llama.cpp: does the GGUF export, run by a real llama.cpp, behave like the model in transformers?

The GGUF files of ``export/gguf.py`` are run by ``llamacpp_runner.py`` (prebuilt libllama of the
llama.cpp install, ``llamacpp_env``) on token-id prompts: every position's logits, one batch per
prompt, f32 KV cache, no flash attention. The reference is stock transformers on CPU in float32:
the merged checkpoint for ``model-<T>.gguf``; base + adapter in PEFT (and the base alone, under
``disable_adapter()``) for ``base-<T>.gguf`` + ``adapter-<T>.gguf``.

Per comparison: max |logit difference|, mean and max KL(reference || GGUF) over positions, the
share of positions whose reference top-1 token is among the GGUF's top 5, and the exact greedy
(argmax) agreement, which is reported, not gated: near-ties of tiny random models flip it under
any rounding. Tolerances by GGUF type (:data:`TOLERANCES`) come from measurements on tiny
E2B/31B/26B-A4B models (merged, CPU): f32 max |logit diff| 7e-3 to 1.4e-2 and mean KL 4e-7
to 1e-6; f16 KL 6e-6 to 1.1e-5; bf16 6.5e-4; q8_0 4e-3 to 6.4e-3, where 1 to 2 positions in 75
lost the reference's top-1 from the top 5 (tiny random models have near-flat logits). KL bounds
keep at least 10x headroom; the top-5 bound is every position for f32/f16, 98% for bf16 and 90%
for q8_0. A model with an adapter GGUF must also show that the adapter changes llama.cpp's
output (G4T611, row 4): its effect must be at least half the reference's. The projector (``mmproj``) is loaded by libmtmd with the text model and must
support exactly the towers the config has. Findings: G4T915 (parity), G4T611 (no effect),
G4T917 (llama.cpp could not run the file), G4T911 (not installed).
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
from gemma4_tune.verify.parity import NO_EFFECT_IN_ENGINE, PROMPTS

GGUF_PARITY_FAILED = register("G4T915", Severity.ERROR, "GGUF output differs from transformers", (2, 22))
RUN_FAILED = register("G4T917", Severity.ERROR, "llama.cpp could not run the GGUF", (22,))

RUNNER = Path(__file__).with_name("llamacpp_runner.py")
DEFAULT_TIMEOUT_S = 600.0
#: The adapter must move llama.cpp's logits by at least this share of what it moves the reference's.
MIN_EFFECT_SHARE = 0.5
#: ... and by at least this much in absolute terms (an adapter that changes nothing fails either way).
MIN_EFFECT = 1e-3
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


def coarser(*types: str) -> str:
    """The lowest-precision GGUF type among ``types`` (its tolerance applies to their combination)."""
    return max(types, key=_ORDER.index)


# --------------------------------------------------------------------------- prompts and references


def default_prompts(model_dir: str | Path) -> list[list[int]]:
    """The verify prompts (``parity.PROMPTS``) rendered with the checkpoint's chat template, as token ids.

    They hold ``<bos>``, ``<|turn>`` and ``<turn|>`` and no multimodal placeholder.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for text in PROMPTS:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        out.append(list(tokenizer(rendered, add_special_tokens=False).input_ids))
    return out


def _forward(model: Any, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    import torch

    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
            rows.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy())
    return rows


def hf_logits(model_dir: str | Path, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per-prompt logits ``[len, vocab]`` of a checkpoint (e.g. the merged one) in transformers, CPU float32."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    return _forward(Gemma4ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval(), prompts)


def peft_logits(base_dir: str | Path, adapter_dir: str | Path, prompts: Sequence[Sequence[int]]) -> dict[str, list]:
    """``{"base": [...], "adapter": [...]}``: base + adapter in PEFT, and the base under ``disable_adapter()``."""
    import torch
    from peft import PeftModel
    from transformers import Gemma4ForConditionalGeneration

    base = Gemma4ForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = {"adapter": _forward(model, prompts)}
    with model.disable_adapter():
        out["base"] = _forward(model, prompts)
    return out


# --------------------------------------------------------------------------- running llama.cpp


def run_llamacpp(request: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, log: Log | None = None,
                 keep_dir: bool = False) -> dict[str, Any]:
    """Run ``llamacpp_runner.py`` with ``request``; return its result with each mode's logits loaded
    (``result["logits"][mode]``, float32 ``[positions, vocab]``). G4T911 without llama.cpp, G4T917
    when the runtime fails."""
    from gemma4_tune.verify.engine_env import engines_root
    from gemma4_tune.verify.llamacpp_env import require_llamacpp

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
    result["logits"] = {mode: np.load(work / info["logits"]) for mode, info in result["modes"].items()}
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


def compare_logits(reference: Sequence[np.ndarray], got: np.ndarray, gguf_type: str) -> dict[str, Any]:
    """Figures of one GGUF run against the reference, and whether they meet ``gguf_type``'s tolerance.

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
    tol = TOLERANCES[gguf_type]
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
    from gemma4_tune.verify.parity import non_finite_finding

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
                log: Log | None = None) -> dict[str, Any]:
    """Run the GGUF export in llama.cpp and compare it with transformers; return figures and findings.

    ``gguf``: an :func:`~gemma4_tune.export.gguf.export_gguf` directory (its record names the files,
    type, merged/base/adapter directories), one ``.gguf`` file, or ``{"model": ..., "mmproj": ...,
    "base": ..., "adapter": ...}``. ``reference``: the merged checkpoint directory (default: the
    record's) or precomputed per-prompt logits for ``model``. ``prompts``: token ids (default:
    :func:`default_prompts`). ``base_reference``: the base model's logits; with it the model's figures
    get ``adapter_effect`` (max |GGUF - base|). ``adapter_reference``: precomputed :func:`peft_logits`; otherwise
    computed from ``base_dir``/``adapter_dir`` (default: the record's). ``n_threads``: llama.cpp's
    threads (default: the CPU count, at most 8). Parity problems come back
    as findings (G4T915, G4T611) with ``ok`` False; G4T911/G4T917 are raised.
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
        log(f"[llama.cpp] running {files['model'].name}" + (f" + {files['mmproj'].name}" if "mmproj" in files else ""))
        result = run_llamacpp(request, timeout_s=timeout_s, log=log)
        out["llama_cpp_build"] = result.get("llama_cpp_build")
        out["chat_template"] = result.get("chat_template")  # what the GGUF's tokenizer.chat_template holds
        start = time.monotonic()
        if reference is None or isinstance(reference, (str, Path)):
            if ref_dir is None:
                raise ValueError("no reference: pass the merged checkpoint directory or precomputed logits")
            log(f"[llama.cpp] computing the transformers reference from {ref_dir} (CPU, float32)")
            ref_rows: Sequence[np.ndarray] = hf_logits(ref_dir, prompts)
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
            adapter_reference = peft_logits(base_dir, adapter_dir, prompts)
        out["timings"]["adapter_reference_s"] = round(time.monotonic() - start, 3)
        out["timings"]["adapter_run_s"] = result["timings"].get("wall_s")
        base_fig = compare_logits(adapter_reference["base"], result["logits"]["base"], combo)
        lora_fig = compare_logits(adapter_reference["adapter"], result["logits"]["adapter"], combo)
        effect = float(np.abs(result["logits"]["adapter"].astype(np.float64) - result["logits"]["base"]).max())
        ref_effect = float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                               for a, b in zip(adapter_reference["adapter"], adapter_reference["base"], strict=True)))
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
        from gemma4_tune.verify.parity import NOTHING_COMPARED

        findings.append(finding(NOTHING_COMPARED.code, f"{gguf}: no model-<type>.gguf, nor a base-<type>.gguf with "
                                "an adapter-<type>.gguf, was recognised: nothing was compared",
                                "pass an `export --gguf` directory, or those .gguf files"))
    out["findings"] = findings
    out["ok"] = not any(f.severity is Severity.ERROR for f in findings)
    return out


def engine_results(base: str | Path, adapter: str | Path, gguf_dir: str | Path, *,
                   log: Log | None = None) -> list[Any]:
    """``verify --engine llama.cpp``: each GGUF of an export directory against the trained model.

    The reference is base + adapter in PEFT (float32, CPU) on the verify prompts, as for every
    other engine. One row for the merged ``model-<T>.gguf`` (with its projector), one for
    ``base-<T>.gguf`` + ``adapter-<T>.gguf`` where the export wrote them. Each row must also show
    that the fine-tune changes llama.cpp's output against the base model (G4T611, row 4).
    """
    log = log or _stderr
    files, record = _files(gguf_dir)
    gguf_type = record.get("gguf_type") or _type_of(files.get("model") or files.get("base") or Path())
    if "model" not in files:
        raise FindingError(finding(RUN_FAILED.code, f"{gguf_dir} holds no model-<type>.gguf",
                                   "export it with `gemma4-tune export --merged DIR --gguf GGUF_DIR`"))
    from gemma4_tune.export.manifest import read_manifest, template_findings

    prompts = default_prompts(base)
    log(f"[llama.cpp] computing the transformers + PEFT reference ({base} + {adapter})")
    reference = peft_logits(base, adapter, prompts)
    results = []
    merged = {k: files[k] for k in ("model", "mmproj") if k in files}
    report = verify_gguf(merged, reference["adapter"], prompts, gguf_type, base_dir=base,
                         base_reference=reference["base"], log=log)
    effect = float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                       for a, b in zip(reference["adapter"], reference["base"], strict=True)))
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
    results.append(_row(f"llama.cpp {files['model'].name}", report["model"], ours, findings, report))
    if "base" in files and "adapter" in files:
        pair = {k: files[k] for k in ("base", "adapter")}
        report = verify_gguf(pair, prompts=prompts, gguf_type=gguf_type, adapter_reference=reference,
                             base_dir=base, adapter_dir=adapter, log=log)
        figures = report["adapter"]
        results.append(_row(f"llama.cpp {files['base'].name} + {files['adapter'].stem}", figures["adapter"],
                            figures["adapter_effect"], list(report["findings"]), report))
    return results


def _row(name: str, figures: dict[str, Any], effect: float, findings: list[Finding], report: dict[str, Any]) -> Any:
    from gemma4_tune.verify.parity import EngineResult

    tol = figures["tolerance"]
    rule = f"KL {tol['mean_kl']:.0e}, top-5 {tol['min_top1_in_top5']:.0%}"
    if tol["max_logit_diff"]:
        rule = f"{tol['max_logit_diff']:.0e}; {rule}"
    return EngineResult(name, figures["max_logit_diff"], figures["greedy_agreement"], effect,
                        float(tol["max_logit_diff"] or "nan"), findings, criterion=rule,
                        prompts=int(report.get("prompts", 0)), positions=int(report.get("positions", 0)),
                        modalities=["text"])


__all__ = ["GGUF_PARITY_FAILED", "RUN_FAILED", "TOLERANCES", "Tolerance", "engine_results", "coarser",
           "compare_logits", "default_prompts", "hf_logits", "peft_logits", "run_llamacpp", "verify_gguf"]
