"""vLLM: does the adapter, served by a real vLLM engine, behave like stock transformers + PEFT?

One engine start covers both modes: the same token prompts are generated greedily without and
with the adapter (``LoRARequest``) by ``vllm_runner.py`` in the vLLM environment
(``engine_env``). The reference is computed here with stock transformers + PEFT
(``reference.hf_reference``: ``PeftModel.from_pretrained`` on a fresh base): greedy tokens, and the
log-softmax of the logits at each generated and each prompt position.

Checks:
- parity (G4T903): greedy tokens agree at every position (fp32), and vLLM's reported
  log-probabilities (top-k + chosen token, generated and prompt positions) are within tolerance;
- effect (G4T902, failure-catalog row 4): the adapter changes vLLM's output at all;
- environment (G4T904) and engine failures (G4T905: a bad adapter kills the engine, rows 3, 7).

Gemma 4 replaces image/audio/video placeholder ids with pad before embedding, in generated
tokens too, and vLLM does not (vllm-cpu.md rule 9): both sides ban those ids (and EOS, so every
sequence has ``max_tokens`` tokens) from generation. Prompts must not contain them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.engines.vllm_env import engines_root, require_vllm_python, scratch_environ, vllm_status
from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.plan.deployment import vllm_max_lora_rank
from gemma4_tune.verify.reference import Reference, ReferenceFn, RefSequence, hf_reference

ADAPTER_NO_EFFECT = register("G4T902", Severity.ERROR, "Adapter changes nothing in vLLM", (4,))
PARITY_MISMATCH = register("G4T903", Severity.ERROR, "vLLM output differs from transformers + PEFT", (4, 6, 7))
ENGINE_FAILED = register("G4T905", Severity.ERROR, "vLLM could not run the model or adapter", (3, 5, 7))

RUNNER = Path(__file__).parents[1] / "engines" / "vllm_runner.py"
UNJUDGED_DTYPE = register("G4T909", Severity.WARNING, "vLLM parity in this dtype has no measured bound: not judged")
#: Max |logprob(vLLM) - logprob(transformers)| allowed, by dtype. fp32 measures at most 3.1e-5 (31B, vLLM-ready
#: copy; docs/verify.md). bf16/fp16 have no bound: this CPU build does not reproduce transformers bf16 even on a
#: right adapter (greedy agreement 29-83%), so no bound can be derived here; their parity is shown, not judged
#: (G4T909), and only "the adapter changes nothing" (an effect of exactly zero) is still an error.
LOGPROB_TOLERANCE = {"float32": 1e-4}
#: Share of greedy positions that must agree, by dtype (fp32: all of them).
MIN_AGREEMENT = {"float32": 1.0}


def unjudged_finding(where: str, dtype: str, agreement: float, gap: float) -> Finding:
    """G4T909: a vLLM comparison in a dtype without a measured bound, its figures stated and not judged."""
    return finding(UNJUDGED_DTYPE.code, f"{where} in {dtype}: greedy agreement {agreement:.0%}, max |logprob diff| "
                   f"{gap:.2e} against transformers + PEFT; no bound for {dtype} has been measured (docs/verify.md), "
                   "so parity was not judged", "judge parity in float32 (`gemma4-tune verify --engine vllm` runs "
                   "float32; `serve --smoke --dtype float32`)", dtype=dtype, greedy_agreement=agreement,
                   max_logprob_diff=gap)
#: Head sizes vLLM 0.32's CPU attention kernel is built for (``CPUAttentionBackend``).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_TIMEOUT_S = 900.0

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- what neither side generates


def banned_token_ids(base_dir: str | Path) -> list[int]:
    """Ids neither side may generate: multimodal placeholders (HF embeds them as pad) and EOS."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    text = config.get("text_config") or config
    banned: set[int] = set()
    for key in ("image_token_id", "audio_token_id", "video_token_id"):
        if isinstance(config.get(key), int):
            banned.add(config[key])
    eos: Any = config.get("eos_token_id", text.get("eos_token_id"))
    gen = Path(base_dir) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    for tok in eos if isinstance(eos, list) else [eos]:
        if isinstance(tok, int):
            banned.add(tok)
    return sorted(banned)


# --------------------------------------------------------------------------- engine run


def _adapter_rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return max(ranks)


def _max_model_len(base_dir: Path, longest_prompt: int, max_tokens: int) -> int:
    config = json.loads((base_dir / "config.json").read_text())
    text = config.get("text_config") or config
    need = longest_prompt + max_tokens
    length = max(128, 1 << math.ceil(math.log2(need)))
    limit = text.get("max_position_embeddings")
    return min(length, int(limit)) if limit else length


class _RunnerProcess:
    """``vllm_runner.py`` running in the vLLM environment; ``wait()`` returns its result JSON."""

    def __init__(self, request: dict[str, Any], *, timeout_s: float, log: Log, keep_dir: bool) -> None:
        python = require_vllm_python()
        runs = engines_root() / "scratch" / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        self.request, self.timeout_s, self.log, self.keep_dir = request, timeout_s, log, keep_dir
        self.work = Path(tempfile.mkdtemp(prefix="vllm-run-", dir=runs))
        shutil.copy2(RUNNER, self.work / "vllm_runner.py")
        (self.work / "request.json").write_text(json.dumps(request))
        self.result_path = self.work / "result.json"
        self.log_path = self.work / "vllm.log"
        self.cmd = [str(python), "-P", str(self.work / "vllm_runner.py"), str(self.work / "request.json"),
                    str(self.result_path)]
        self.tail: deque[str] = deque(maxlen=60)
        self.start = time.monotonic()
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.cmd, cwd=self.work, env=scratch_environ(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if not self._log_file.closed:
                self._log_file.write(raw)
            line = raw.rstrip("\n")
            if line.strip():
                self.tail.append(line)
            if line.startswith("[vllm runner] "):
                self.log(f"[vllm] {line[len('[vllm runner] '):]}")

    def kill(self) -> None:
        """Stop the runner and its engine processes (its own process group)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def failure(self, why: str, requests: list[dict[str, Any]], **details: Any) -> Finding:
        """G4T905 for ``requests`` (what the engine was serving when it failed), with the log's root cause."""
        adapters = [a for r in requests for a in [r.get("adapter"), *(r.get("adapters") or {}).values()] if a]
        return finding(
            ENGINE_FAILED.code, f"vLLM {why} serving {', '.join(str(r['model']) for r in requests)}"
            + (f" with adapter {', '.join(adapters)}" if adapters else "")
            + ":\n" + "\n".join(useful_tail(self.tail)) + f"\n(full log: {self.log_path})",
            "read the engine log for the first error; an adapter vLLM refuses (modules outside its "
            "list, rank above --max-lora-rank, DoRA, bias) must be re-exported with `gemma4-tune plan` "
            "targets, or the merged checkpoint served instead", log=str(self.log_path),
            command=self.cmd, **details)

    def wait(self) -> dict[str, Any]:
        """The runner's result, or G4T905 when it failed or ran past its time."""
        timed_out = False
        remaining = self.timeout_s - (time.monotonic() - self.start)
        try:
            rc = self.proc.wait(timeout=max(remaining, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            rc = self.proc.wait()
        # Engine processes the runner left behind (its own session) would hold the pipe open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self._reader.join(timeout=10)
        self._log_file.close()
        elapsed = time.monotonic() - self.start
        if timed_out or rc != 0 or not self.result_path.exists():
            why = f"timed out after {self.timeout_s:.0f} s" if timed_out else f"exited with status {rc}"
            raise FindingError(self.failure(why, _runs(self.request), seconds=round(elapsed, 1)))
        result = json.loads(self.result_path.read_text())
        result.setdefault("timings", {})["wall_s"] = round(elapsed, 3)
        self.log(f"[vllm] engine run done in {elapsed:.1f} s (engine start "
                 f"{result['timings'].get('engine_start_s', 0):.1f} s)")
        if self.keep_dir:
            result["work_dir"] = str(self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return result


def _runs(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The single-model requests of a request (``{"runs": [...]}`` holds several)."""
    return list(request["runs"]) if "runs" in request else [request]


def start_vllm(request: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, log: Log | None = None,
               keep_dir: bool = False) -> _RunnerProcess:
    """Start ``vllm_runner.py`` with ``request`` in the vLLM environment; ``.wait()`` for its result.

    The runner is copied into a fresh work directory first: run from its place in the package,
    its directory (holding ``vllm.py`` and ``peft.py``) would shadow the real ``vllm`` and
    ``peft`` packages on ``sys.path``. vLLM's own log goes to ``vllm.log`` there (kept when the
    run fails); the runner's progress lines are echoed. Raises G4T904 without an environment.
    """
    log = log or _stderr
    for one in _runs(request):
        modes = ["base", *(["lora"] if one.get("adapter") else []), *(one.get("adapters") or {})]
        log(f"[vllm] starting a vLLM engine for {one['model']} (modes {', '.join(modes)}; "
            f"{len(one['prompts'])} prompts): ~15 s to import, ~5-10 s to start on CPU, ~25 s more for the "
            "first request on a fresh machine")
    return _RunnerProcess(request, timeout_s=timeout_s, log=log, keep_dir=keep_dir)


def run_vllm(request: dict[str, Any], *, timeout_s: float = DEFAULT_TIMEOUT_S, log: Log | None = None,
             keep_dir: bool = False) -> dict[str, Any]:
    """Run ``vllm_runner.py`` with ``request`` and return its result JSON (see :func:`start_vllm`).

    Raises G4T904 without an environment, G4T905 when the engine fails or runs past ``timeout_s``.
    """
    return start_vllm(request, timeout_s=timeout_s, log=log, keep_dir=keep_dir).wait()


_WRAPPERS = ("EngineDeadError", "CalledProcessError", "ValidationError")


def useful_tail(lines: Sequence[str], n: int = 4) -> list[str]:
    """The root-cause error line (vLLM wraps worker errors several times), then the last lines."""
    lines = list(lines)
    causes = [line for line in lines if re.search(r"\b\w*(Error|Exception): ", line)
              and not any(w in line for w in _WRAPPERS)]
    head = ["cause: " + re.sub(r"^.*?\] ", "", causes[0]).strip()] if causes else []
    return head + lines[-n:]


# --------------------------------------------------------------------------- comparison


@dataclass
class ModeParity:
    """vLLM against the reference in one mode (``base`` or an adapter)."""

    mode: str
    positions: int
    agreeing: int
    max_logprob_diff: float
    max_prompt_logprob_diff: float
    first_divergence: list[int | None]
    non_finite: int = 0  # logprobs vLLM returned that are NaN or +inf, of ``values``
    values: int = 0

    @property
    def greedy_agreement(self) -> float:
        """Share of generated positions where vLLM chose the reference's token."""
        return self.agreeing / self.positions if self.positions else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"mode": self.mode, "positions": self.positions, "greedy_agreement": self.greedy_agreement,
                "max_logprob_diff": self.max_logprob_diff, "max_prompt_logprob_diff": self.max_prompt_logprob_diff,
                "first_divergence": self.first_divergence, "non_finite": self.non_finite}


@dataclass
class VllmParity:
    """Figures and findings of one adapter's vLLM parity check."""

    vllm_version: str
    dtype: str
    adapter: str
    prompts: int
    max_tokens: int
    base: ModeParity
    lora: ModeParity
    adapter_effect: float          # max |logprob(adapter) - logprob(base)| in vLLM, same contexts
    tokens_changed: float          # share of generated tokens vLLM changes with the adapter
    reference_effect: float        # max |logprob(adapter) - logprob(base)| in transformers + PEFT
    tolerance: float
    min_agreement: float
    k_eq_v_layers: list[int] = field(default_factory=list)  # k_proj LoRA vLLM keeps off V (see below)
    timings: dict[str, float] = field(default_factory=dict)
    judged: bool = True  # False: no measured bound for the dtype (G4T909): parity figures shown, not judged
    findings: list[Finding] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict, repr=False)  # the runner's raw output

    @property
    def greedy_agreement(self) -> float:
        """Agreement with the adapter (the served model)."""
        return self.lora.greedy_agreement

    @property
    def max_logprob_diff(self) -> float:
        """Largest logprob difference over both modes, generated and prompt positions."""
        from gemma4_tune.verify.verdict import worst

        return worst((self.base.max_logprob_diff, self.lora.max_logprob_diff, self.base.max_prompt_logprob_diff,
                      self.lora.max_prompt_logprob_diff))

    @property
    def ok(self) -> bool:
        """No error finding."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the raw runner output)."""
        return {
            "vllm_version": self.vllm_version, "dtype": self.dtype, "adapter": self.adapter, "prompts": self.prompts,
            "max_tokens": self.max_tokens, "greedy_agreement": self.greedy_agreement,
            "max_logprob_diff": self.max_logprob_diff, "adapter_effect": self.adapter_effect,
            "tokens_changed": self.tokens_changed, "reference_effect": self.reference_effect,
            "tolerance": self.tolerance if self.judged else None, "min_agreement": self.min_agreement,
            "judged": self.judged, "ok": self.ok, "k_eq_v_layers": self.k_eq_v_layers, "modes": {"base": self.base.to_dict(), "adapter": self.lora.to_dict()},
            "timings": self.timings, "findings": [f.to_dict() for f in self.findings],
        }


def _lp(rows: Any, i: int, tok: int) -> float:
    value = rows[i][tok]
    return float(value.item() if hasattr(value, "item") else value)


def _gap(a: float, b: float) -> float:
    """|a - b|, 0 when both are the same infinity, NaN when either is NaN (never dropped: see ``worst``)."""
    return 0.0 if a == b else abs(a - b)


def _non_finite(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """How many logprobs vLLM returned that are NaN or +inf (a probability above 1), of how many."""
    values = [float(lp) for row in rows for entries in (row["logprobs"], (row.get("prompt_logprobs") or [])[1:])
              for entry in entries for lp in (entry or {}).values()]
    return sum(math.isnan(v) or v == math.inf for v in values), len(values)


def compare_mode(mode: str, vllm_rows: list[dict[str, Any]], reference: list[RefSequence]) -> ModeParity:
    """Greedy agreement and logprob differences of one mode.

    Generated positions are compared up to and including the first divergence (after it the
    two sides continue from different contexts); positions after it count as disagreeing.
    Every prompt position vLLM reports is compared. A NaN anywhere makes the figure NaN.
    """
    from gemma4_tune.verify.verdict import worst

    positions = agreeing = 0
    max_diff = max_prompt_diff = 0.0
    divergence: list[int | None] = []
    for got, ref in zip(vllm_rows, reference, strict=True):
        toks, want = got["token_ids"], list(ref.token_ids)
        n = max(len(toks), len(want))
        positions += n
        first = next((j for j in range(n) if j >= len(toks) or j >= len(want) or toks[j] != want[j]), None)
        divergence.append(first)
        agreeing += n if first is None else first
        upto = min(len(toks), len(want), n if first is None else first + 1)
        for j in range(upto):
            max_diff = worst((_gap(float(lp), _lp(ref.logprobs, j, int(tok)))
                              for tok, lp in (got["logprobs"][j] or {}).items()), max_diff)
        if got.get("prompt_logprobs") is not None and ref.prompt_logprobs is not None:
            for i, entry in enumerate(got["prompt_logprobs"][1:]):
                max_prompt_diff = worst((_gap(float(lp), _lp(ref.prompt_logprobs, i, int(tok)))
                                         for tok, lp in (entry or {}).items()), max_prompt_diff)
    bad, values = _non_finite(vllm_rows)
    return ModeParity(mode, positions, agreeing, max_diff, max_prompt_diff, divergence, bad, values)


def _vllm_effect(base_rows: list[dict[str, Any]], lora_rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Max logprob change the adapter causes in vLLM (same contexts only), and share of tokens changed."""
    from gemma4_tune.verify.verdict import worst

    effect = 0.0
    changed = total = 0
    for b, a in zip(base_rows, lora_rows, strict=True):
        for pb, pa in zip((b.get("prompt_logprobs") or [])[1:], (a.get("prompt_logprobs") or [])[1:], strict=False):
            effect = worst((_gap(pb[tok], pa[tok]) for tok in set(pb or {}) & set(pa or {})), effect)
        same_context = True
        for j, (tb, ta) in enumerate(zip(b["token_ids"], a["token_ids"], strict=False)):
            total += 1
            if same_context:
                lb, la = b["logprobs"][j] or {}, a["logprobs"][j] or {}
                effect = worst((_gap(lb[tok], la[tok]) for tok in set(lb) & set(la)), effect)
            if tb != ta:
                changed += 1
                same_context = False
    return effect, (changed / total if total else 0.0)


def _ref_effect(base: list[RefSequence], lora: list[RefSequence]) -> float:
    """Max logprob change the adapter causes in the reference, on prompt positions and the first generated one."""
    import torch

    from gemma4_tune.verify.verdict import worst

    effect = 0.0
    for b, a in zip(base, lora, strict=True):
        pairs = [(b.logprobs[:1], a.logprobs[:1])]
        if b.prompt_logprobs is not None and a.prompt_logprobs is not None:
            pairs.append((b.prompt_logprobs, a.prompt_logprobs))
        for rb, ra in pairs:
            diff = (torch.as_tensor(rb, dtype=torch.float64) - torch.as_tensor(ra, dtype=torch.float64)).abs()
            if diff.numel():
                effect = worst((float(diff.max()),), effect)
    return effect


def compare(result: dict[str, Any], reference: Reference, *, mode: str = "lora", dtype: str = "float32",
            tolerance: float | None = None, min_agreement: float | None = None,
            k_eq_v_layers: Sequence[int] = ()) -> VllmParity:
    """Figures and findings for adapter ``mode`` from a runner result and a reference.

    ``reference`` holds ``"base"`` and ``mode`` (an :func:`hf_reference` result has ``"lora"``).
    """
    judged = tolerance is not None or dtype in LOGPROB_TOLERANCE
    tolerance = (LOGPROB_TOLERANCE.get(dtype, 0.0) if tolerance is None else tolerance) if judged else 0.0
    min_agreement = MIN_AGREEMENT.get(dtype, 0.0) if min_agreement is None else min_agreement
    rows = result["results"]
    base = compare_mode("base", rows["base"], reference["base"])
    lora = compare_mode(mode, rows[mode], reference[mode])
    effect, changed = _vllm_effect(rows["base"], rows[mode])
    adapters = result.get("adapters") or {"lora": result.get("adapter")}
    parity = VllmParity(
        vllm_version=result.get("vllm_version", "?"), dtype=dtype, adapter=str(adapters.get(mode)),
        prompts=len(rows[mode]), max_tokens=int(result.get("max_tokens", 0)), base=base, lora=lora,
        adapter_effect=effect, tokens_changed=changed, reference_effect=_ref_effect(reference["base"], reference[mode]),
        tolerance=tolerance, min_agreement=min_agreement, k_eq_v_layers=list(k_eq_v_layers),
        timings=dict(result.get("timings", {})), result=result, judged=judged)
    parity.findings = _findings(parity)
    return parity


def _findings(p: VllmParity) -> list[Finding]:
    from gemma4_tune.verify.verdict import non_finite_finding, worst

    where = f"vLLM {p.vllm_version}"
    broken = [m for m in (p.base, p.lora) if m.non_finite]
    if broken:  # the cause: the NaN figures it makes are not findings of their own
        return [non_finite_finding(f"{where} {'without' if m.mode == 'base' else 'with'} the adapter", m.non_finite,
                                   m.values, "the served weights hold NaN or infinite values (a diverged run, a "
                                   "broken checkpoint): check the adapter with `gemma4-tune verify --engine peft` "
                                   "and the base checkpoint's files") for m in broken]
    out: list[Finding] = []
    if not (p.adapter_effect > p.tolerance) and p.tokens_changed == 0.0:
        if p.reference_effect > p.tolerance:
            msg = (f"{where} serves the adapter {p.adapter} but its output is the base model's (logprobs move by "
                   f"at most {p.adapter_effect:.1e}; in transformers + PEFT they move by {p.reference_effect:.2g})")
            fix = ("the engine dropped the LoRA deltas: check its log for ignored modules, use a vLLM with the "
                   "fix for vllm#39815, or serve the merged checkpoint")
        else:
            msg = (f"the adapter {p.adapter} changes nothing in {where} (logprobs move by at most "
                   f"{p.adapter_effect:.1e}), nor in transformers + PEFT")
            fix = "check that training ran (metrics.jsonl) and that lora_B is not all zeros"
        out.append(finding(ADAPTER_NO_EFFECT.code, msg, fix, adapter=p.adapter, adapter_effect=p.adapter_effect,
                           reference_effect=p.reference_effect))
    elif p.judged:  # does the adapter itself (in transformers + PEFT, same units) barely move the model?
        from gemma4_tune.verify.verdict import effect_findings

        out += [f for f in effect_findings(f"{where} (transformers + PEFT reference)", p.reference_effect, p.tolerance)
                if f.severity is Severity.WARNING]
    if not p.judged:
        return [*out, unjudged_finding(f"{where} with the adapter", p.dtype, p.lora.greedy_agreement,
                                       worst((p.max_logprob_diff,)))]
    for mode in (p.base, p.lora):
        label = "without the adapter" if mode.mode == "base" else "with the adapter"
        if mode.greedy_agreement < p.min_agreement:
            diverged = [i for i, d in enumerate(mode.first_divergence) if d is not None]
            out.append(finding(PARITY_MISMATCH.code, f"{where} {label} chooses other greedy tokens than "
                               f"transformers + PEFT: {mode.greedy_agreement:.0%} agreement (prompts "
                               f"{diverged} diverge at positions {[mode.first_divergence[i] for i in diverged]})",
                               _parity_fix(mode.mode, p), mode=mode.mode, greedy_agreement=mode.greedy_agreement,
                               k_eq_v_layers=p.k_eq_v_layers))
        gap = worst((mode.max_logprob_diff, mode.max_prompt_logprob_diff))
        if not (gap <= p.tolerance):  # a NaN gap fails too
            out.append(finding(PARITY_MISMATCH.code, f"{where} {label} differs from transformers + PEFT by "
                               f"{gap:.2e} in log-probability (tolerance {p.tolerance:.0e}, {p.dtype})",
                               _parity_fix(mode.mode, p), mode=mode.mode, max_logprob_diff=gap,
                               k_eq_v_layers=p.k_eq_v_layers))
    return out


def _parity_fix(mode: str, p: VllmParity) -> str:
    if mode != "base" and p.k_eq_v_layers:
        return (f"vLLM applies the k_proj LoRA of K=V global layers {p.k_eq_v_layers} to the keys only, while "
                "transformers applies it to keys and values (they share k_proj): serve the adapter made by "
                "`gemma4_tune.verify.vllm.vllm_ready_adapter` (k_proj LoRA copied to v_proj there), leave k_proj "
                "out of the targets on those layers, or serve the merged checkpoint")
    if mode == "base":
        return ("the base model itself is served differently: check the checkpoint's key set (KV-shared "
                "layers, catalog row 7) and the engine log for weights 'not initialized from checkpoint'")
    return ("compare the adapter's modules with vLLM's supported list (`gemma4-tune plan`): unsupported or "
            "KV-shared k/v LoRA is silently ignored; otherwise serve the merged checkpoint")


# --------------------------------------------------------------------------- entry points


def _check_cpu_shapes(base_dir: Path) -> None:
    """Refuse, before starting an engine, head sizes vLLM's CPU attention kernel has no build for."""
    if (vllm_status().get("flavour") or "cpu") != "cpu":
        return
    text = json.loads((base_dir / "config.json").read_text())
    text = text.get("text_config") or text
    sizes = {text.get(k) for k in ("head_dim", "global_head_dim") if text.get(k)}
    bad = sorted(s for s in sizes if s not in VLLM_CPU_HEAD_SIZES)
    if bad:
        raise FindingError(finding(
            ENGINE_FAILED.code, f"vLLM's CPU attention has no kernel for head size {bad} of {base_dir} "
            f"(it supports {list(VLLM_CPU_HEAD_SIZES)}; the engine would die with `Unsupported CPU attention "
            "configuration`)", "check on a CUDA machine, or use a model whose head_dim and global_head_dim "
            "are among the supported sizes", head_sizes=bad))


@dataclass
class PlannedRun:
    """One model's run in a runner process: its request, the reference to compute while the engine starts,
    and what turns the runner's result into parity objects."""

    request: dict[str, Any]
    reference: Callable[[], None]
    finish: Callable[[dict[str, Any]], Any]
    what: str = ""


def run_planned(planned: Sequence[PlannedRun], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                log: Log | None = None) -> list[Any]:
    """Run every planned model in one runner process (one import of vLLM), computing the references while
    the engines start. A run whose engine failed comes back as its G4T905 ``FindingError`` (not raised), so
    the other runs still report; a runner that fails as a whole raises it."""
    log = log or _stderr
    request = planned[0].request if len(planned) == 1 else {"runs": [p.request for p in planned]}
    runner = start_vllm(request, timeout_s=timeout_s, log=log)
    try:
        for p in planned:
            p.reference()
        result = runner.wait()
    except BaseException:
        runner.kill()
        raise
    out: list[Any] = []
    for p, one in zip(planned, _runs(result) if "runs" in result else [result], strict=True):
        if "failed" in one:
            out.append(FindingError(runner.failure(f"failed ({one['failed']})", [p.request])))
            continue
        one.setdefault("timings", {})["wall_s"] = result.get("timings", {}).get("wall_s")
        out.append(p.finish(one))
    return out


def adapter_run(base_dir: str | Path, adapters: dict[str, str | Path], prompts: list[list[int]], *,
                max_tokens: int = 8, reference: dict[str, Reference] | ReferenceFn | None = None,
                logprobs: int = 5, prompt_logprobs: int | None = 5, dtype: str = "float32",
                max_lora_rank: int | None = None, enable_tower_connector_lora: bool = False,
                tolerance: float | None = None, log: Log | None = None) -> PlannedRun:
    """The planned run of :func:`vllm_parity_many`; its ``finish`` gives ``{name: VllmParity}``."""
    log = log or _stderr
    base_dir = Path(base_dir)
    adapters = {str(k): Path(v) for k, v in adapters.items()}
    if not adapters or "base" in adapters:
        raise ValueError("give at least one adapter, none named 'base'")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("vllm_parity needs at least one non-empty prompt")
    banned = banned_token_ids(base_dir)
    placeholders = [i for i, p in enumerate(prompts) if set(p) & set(banned)]
    if placeholders:
        raise ValueError(f"prompts {placeholders} contain multimodal placeholder or EOS ids {banned}: "
                         "a text parity check cannot use them")
    require_vllm_python()  # G4T904 before any work
    _check_cpu_shapes(base_dir)
    ranks = {name: _adapter_rank(path) for name, path in adapters.items()}
    rank = max_lora_rank or vllm_max_lora_rank(max(ranks.values()))
    if rank is None:
        raise ValueError(f"adapter rank {max(ranks.values())} is above vLLM's largest --max-lora-rank")
    request = {
        "model": str(base_dir.resolve()), "adapters": {n: str(p.resolve()) for n, p in adapters.items()},
        "max_lora_rank": rank, "prompts": prompts, "max_tokens": max_tokens, "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs, "dtype": dtype,
        "max_model_len": _max_model_len(base_dir, max(map(len, prompts)), max_tokens), "banned_token_ids": banned,
        "enable_tower_connector_lora": enable_tower_connector_lora,
    }
    refs: dict[str, Reference] = {}
    ref_s: list[float] = [0.0]

    def compute() -> None:
        if reference is None or callable(reference):
            fn = reference or hf_reference
            start = time.monotonic()
            for name, path in adapters.items():
                log(f"[vllm] computing the transformers + PEFT reference for {name} while the engine starts")
                refs[name] = fn(base_dir, path, prompts, max_tokens=max_tokens, banned=banned, dtype=dtype)
            ref_s[0] = time.monotonic() - start
        else:
            refs.update(reference)

    def finish(result: dict[str, Any]) -> dict[str, VllmParity]:
        out: dict[str, VllmParity] = {}
        for name in adapters:
            ref = refs[name]
            ref = {"base": ref["base"], name: ref[name] if name in ref else ref["lora"]}
            parity = compare(result, ref, mode=name, dtype=dtype, tolerance=tolerance,
                             k_eq_v_layers=k_eq_v_lora_layers(base_dir, adapters[name]))
            parity.timings["reference_s"] = round(ref_s[0], 3)
            log(f"[vllm] {name}: greedy agreement {parity.greedy_agreement:.0%}, max |logprob diff| "
                f"{parity.max_logprob_diff:.1e}, adapter effect {parity.adapter_effect:.2g} "
                f"({len(parity.findings)} findings)")
            out[name] = parity
        return out

    return PlannedRun(request, compute, finish, what=f"{base_dir} + {', '.join(adapters)}")


def vllm_parity_many(base_dir: str | Path, adapters: dict[str, str | Path], prompts: list[list[int]], *,
                     max_tokens: int = 8, reference: dict[str, Reference] | ReferenceFn | None = None,
                     logprobs: int = 5, prompt_logprobs: int | None = 5, dtype: str = "float32",
                     timeout_s: float = DEFAULT_TIMEOUT_S, max_lora_rank: int | None = None,
                     enable_tower_connector_lora: bool = False, tolerance: float | None = None,
                     log: Log | None = None) -> dict[str, VllmParity]:
    """:func:`vllm_parity` for several adapters of one base model in one engine start.

    ``reference`` is ``{name: Reference}``, a callable with :func:`hf_reference`'s signature
    (called per adapter), or None. The reference is computed while the engine starts.
    """
    planned = adapter_run(base_dir, adapters, prompts, max_tokens=max_tokens, reference=reference, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, dtype=dtype, max_lora_rank=max_lora_rank,
                          enable_tower_connector_lora=enable_tower_connector_lora, tolerance=tolerance, log=log)
    (out,) = run_planned([planned], timeout_s=timeout_s, log=log)
    if isinstance(out, FindingError):
        raise out
    return out


def vllm_parity(base_dir: str | Path, adapter_dir: str | Path, prompts: list[list[int]], *, max_tokens: int = 8,
                reference: Reference | ReferenceFn | None = None, logprobs: int = 5, prompt_logprobs: int | None = 5,
                dtype: str = "float32", timeout_s: float = DEFAULT_TIMEOUT_S, max_lora_rank: int | None = None,
                enable_tower_connector_lora: bool = False, tolerance: float | None = None,
                log: Log | None = None) -> VllmParity:
    """Serve ``base_dir`` + ``adapter_dir`` in a real vLLM and compare it with transformers + PEFT.

    ``reference``: a precomputed :data:`Reference` (``{"base": [...], "lora": [...]}``), a callable
    with :func:`hf_reference`'s signature, or None (:func:`hf_reference`, run while the engine
    starts). One engine start runs both modes. Raises G4T904 when the vLLM environment is not
    installed and G4T905 when the engine cannot run; parity and effect problems come back as
    findings (G4T903, G4T902) on the result.
    """
    refs = {"lora": reference} if isinstance(reference, dict) else reference
    return vllm_parity_many(base_dir, {"lora": adapter_dir}, prompts, max_tokens=max_tokens, reference=refs,
                            logprobs=logprobs, prompt_logprobs=prompt_logprobs, dtype=dtype, timeout_s=timeout_s,
                            max_lora_rank=max_lora_rank, enable_tower_connector_lora=enable_tower_connector_lora,
                            tolerance=tolerance, log=log)["lora"]
