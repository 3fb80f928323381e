"""``serve``: a real vLLM OpenAI-compatible server for a base model and its adapters (or a merged checkpoint).

Before anything starts, each adapter is checked the way ``export --for vllm`` checks it, and
served so that vLLM reproduces transformers + PEFT: K=V global layers get the vLLM-ready copy
(G4T210), tower LoRA is refused on CPU builds (the experimental tower flag does not start there;
``--text-only`` serves the text part), and on CUDA builds the tower flag is passed; MoE expert
LoRA, which vLLM drops (row 6), is refused with "serve the merged checkpoint".

The server runs in the vLLM environment (``engine_env``) on 127.0.0.1, in its own process
group, with its log in the work directory. ``--smoke`` sends one completion request per mode
(the base model and each adapter, or the merged checkpoint) and compares greedy tokens and
log-probabilities with the reference, base + adapter in transformers + PEFT, exactly as
``verify --engine vllm`` does (G4T902/G4T903); then it stops the server.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.engines.vllm_env import engines_root, require_vllm_python, scratch_environ, vllm_status
from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers, vllm_ready_adapter
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register
from gemma4_tune.plan.deployment import vllm_max_lora_rank
from gemma4_tune.verify.parity import text_only_adapter
from gemma4_tune.verify.reference import hf_reference
from gemma4_tune.verify.verdict import non_finite_finding, worst
from gemma4_tune.verify.vllm import (
    ENGINE_FAILED,
    LOGPROB_TOLERANCE,
    MIN_AGREEMENT,
    PARITY_MISMATCH,
    banned_token_ids,
    compare,
    compare_mode,
    unjudged_finding,
    useful_tail,
)

NOT_SERVABLE = register("G4T906", Severity.ERROR, "vLLM would not serve this adapter as trained", (3, 4, 6))
PORT_BUSY = register("G4T907", Severity.ERROR, "The server port is already in use")
SMOKE_UNREFERENCED = register("G4T908", Severity.WARNING, "Smoke check without the trained adapter: parity not verified")

Log = Callable[[str], None]
SMOKE_MAX_TOKENS = 8
DEFAULT_MAX_MODEL_LEN = 8192
HEALTH_TIMEOUT_S = 900.0


@dataclass
class ServePlan:
    """What the server will load: the model, the adapters by served name, and the flags that implies."""

    model: Path
    served_name: str
    dtype: str
    max_model_len: int
    adapters: dict[str, Path] = field(default_factory=dict)   # served name -> directory vLLM loads
    trained: dict[str, Path] = field(default_factory=dict)    # served name -> adapter as trained (reference)
    reference_base: Path | None = None                        # base of the reference (merged serving)
    reference_adapter: Path | None = None
    max_lora_rank: int | None = None
    tower_flag: bool = False
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def args(self, host: str, port: int) -> list[str]:
        """The ``vllm.entrypoints.openai.api_server`` arguments."""
        args = ["--model", str(self.model), "--served-model-name", self.served_name, "--host", host,
                "--port", str(port), "--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        if self.adapters:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras",
                     str(len(self.adapters)), "--lora-modules",
                     *(f"{name}={path}" for name, path in self.adapters.items())]
        if self.tower_flag:
            args.append("--enable-tower-connector-lora")
        return args


def parse_adapters(values: Sequence[str]) -> dict[str, Path]:
    """``NAME=DIR`` or ``DIR`` (named after the folder, or its run folder for ``.../adapter``)."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            folder = Path(value).resolve()
            name = folder.parent.name if folder.name == "adapter" else folder.name
        if not name or name == "base" or name in out:
            raise FindingError(finding(NOT_SERVABLE.code, f"adapter name {name!r} is empty, reserved or repeated",
                                       "name each adapter uniquely: --adapter NAME=DIR"))
        out[name] = Path(path)
    return out


def _config_dtype(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or {}
    dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "bfloat16"
    return str(dtype)


def _default_max_model_len(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or config
    return min(int(text.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN), DEFAULT_MAX_MODEL_LEN)


def plan_serving(base: str | Path, adapters: dict[str, Path], work_dir: Path, *, merged: str | Path | None = None,
                 text_only: bool = False, flavour: str | None = None, dtype: str | None = None,
                 max_model_len: int | None = None, served_name: str | None = None) -> ServePlan:
    """Check every adapter for vLLM and decide what to serve; raises the findings that block serving."""
    from gemma4_tune.export.adapter import check_adapter_for_engines
    from gemma4_tune.export.manifest import (
        check_adapter_matches_base,
        check_served_template,
        manifest_quantization,
    )

    base = Path(base)
    flavour = flavour or vllm_status().get("flavour") or "cpu"
    model = Path(merged) if merged else base
    plan = ServePlan(model=model.resolve(), served_name=served_name or model.resolve().name,
                     dtype=dtype or _config_dtype(model), max_model_len=max_model_len or _default_max_model_len(model))
    for adapter in adapters.values():  # G4T812 warns, G4T813 stops: the template it was trained with (row 34)
        plan.findings += check_served_template(adapter, [model])
    if merged:
        if len(adapters) > 1:
            raise FindingError(finding(NOT_SERVABLE.code, "a merged checkpoint is served alone; give at most one "
                                       "--adapter (the one it was merged from, for --smoke's reference)",
                                       "serve other adapters on the base model in a second server"))
        for adapter in adapters.values():
            check_adapter_matches_base(adapter, base)
            plan.reference_base, plan.reference_adapter = base, adapter
        return plan
    blocking: list[Finding] = []
    ranks = []
    for name, adapter in adapters.items():
        summary = check_adapter_for_engines(base, adapter, ["vllm"])  # refuses a foreign base (G4T801/802)
        ranks.append(summary.rank)
        codes = {f.code for f in summary.findings}
        blocking += [f for f in summary.findings if f.severity is Severity.ERROR]
        served = adapter
        quant = manifest_quantization(adapter)
        if quant is not None:  # row 38: vLLM would serve it on the full-precision base, another model
            blocking.append(finding(NOT_SERVABLE.code, f"adapter {name} was trained on the base in {quant.describe()}; "
                                    "vLLM serves LoRA on the full-precision base, another model than the one trained "
                                    "(verify measures it: G4T619)", f"merge it into the dequantized 4-bit weights and "
                                    f"serve that: gemma4-tune export --base {base} --adapter {adapter} --merged "
                                    f"MERGED, then gemma4-tune serve --base {base} --merged MERGED --adapter "
                                    f"{adapter}", adapter=str(adapter)))
        if "G4T202" in codes:
            blocking.append(finding(NOT_SERVABLE.code, f"adapter {name} trains MoE experts; vLLM drops PEFT's expert "
                                    "LoRA keys, so the served model would be the base model there",
                                    f"merge it and serve the merged checkpoint: gemma4-tune export --base {base} "
                                    f"--adapter {adapter} --merged MERGED, then gemma4-tune serve --base {base} "
                                    f"--merged MERGED", adapter=str(adapter)))
        if "G4T201" in codes:
            if text_only:
                served = text_only_adapter(served, work_dir / f"{name}-text")
                plan.notes.append(f"{name}: text LoRA only (tower LoRA left out: --text-only)")
            elif flavour == "cpu":
                blocking.append(finding(NOT_SERVABLE.code, f"adapter {name} has vision/audio tower (or embedder) "
                                        "LoRA; vLLM's CPU build does not start with enable_tower_connector_lora, and "
                                        "without it those deltas are not served as trained", "serve the merged "
                                        "checkpoint (gemma4-tune export --merged, then serve --merged), or pass --text-only to serve the text part "
                                        "(images and audio then go through the base towers)", adapter=str(adapter)))
            else:
                plan.tower_flag = True
                plan.notes.append(f"{name}: tower LoRA served with --enable-tower-connector-lora (experimental)")
        if "G4T210" in codes:
            served = vllm_ready_adapter(served, base, work_dir / f"{name}-vllm-ready")
            plan.notes.append(f"{name}: k_proj LoRA of K=V layers copied to v_proj (vLLM-ready copy, G4T210)")
        plan.findings += [f for f in summary.findings if f.severity is not Severity.ERROR
                          and f.code not in ("G4T201", "G4T202", "G4T203", "G4T210")]
        plan.adapters[name] = served.resolve()
        plan.trained[name] = adapter
    if blocking:
        raise FindingError(*blocking)
    if ranks:
        plan.max_lora_rank = vllm_max_lora_rank(max(ranks))
    return plan


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is not busy
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class VllmServer:
    """vLLM's OpenAI-compatible server in the vLLM environment, in its own process group."""

    def __init__(self, plan: ServePlan, *, host: str = "127.0.0.1", port: int = 8000, log_path: Path,
                 log: Log) -> None:
        self.plan, self.host, self.log = plan, host, log
        self.port = free_port() if port == 0 else port
        if _port_busy(host, self.port):
            raise FindingError(finding(PORT_BUSY.code, f"port {self.port} on {host} is already in use",
                                       "stop what listens there, or pass another --port (0 picks a free one)"))
        self.log_path = log_path
        self.cmd = [str(require_vllm_python()), "-P", "-m", "vllm.entrypoints.openai.api_server",
                    *plan.args(host, self.port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Launch the server (returns at once; :meth:`wait_healthy` waits for it)."""
        self.started = time.monotonic()
        with open(self.log_path, "wb") as handle:
            self.proc = subprocess.Popen(self.cmd, cwd=self.log_path.parent, env=scratch_environ(), stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _tail(self, n: int = 60) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if line.strip()][-n:]

    def _failure(self, why: str) -> FindingError:
        return FindingError(finding(
            ENGINE_FAILED.code, f"the vLLM server {why}:\n" + "\n".join(useful_tail(self._tail()))
            + f"\n(full log: {self.log_path})", "read the log for the first error; an adapter vLLM refuses must be "
            "re-exported with `gemma4-tune plan` targets, or the merged checkpoint served instead",
            log=str(self.log_path), command=self.cmd))

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Poll ``/health`` until it answers 200; seconds since start. G4T905 if the server dies or times out."""
        assert self.proc is not None
        last_note = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise self._failure(f"exited with status {self.proc.returncode} while starting")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started
            elapsed = time.monotonic() - self.started
            if elapsed > timeout_s:
                self.stop()
                raise self._failure(f"did not answer /health within {timeout_s:.0f} s")
            if time.monotonic() - last_note >= 15:
                last_note = time.monotonic()
                tail = self._tail(1)
                self.log(f"[serve] still starting ({elapsed:.0f} s){': ' + tail[-1][-100:] if tail else ''}")
            time.sleep(0.5)

    def request(self, path: str, payload: dict[str, Any] | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
        """GET (no payload) or POST JSON to the server; the decoded reply."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[:500]
            raise FindingError(finding(ENGINE_FAILED.code, f"the vLLM server answered {path} with HTTP {exc.code}: "
                                       f"{body}", f"read the server log {self.log_path}")) from None

    def stop(self, timeout_s: float = 20.0) -> float:
        """SIGTERM the server's process group, SIGKILL after ``timeout_s``; seconds it took."""
        start = time.monotonic()
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # engine workers left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        return time.monotonic() - start


def curl_example(server: VllmServer, model: str) -> str:
    """A request a user can paste to try the served model."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    return f"curl {server.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def _rows(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """A completions reply (token ids as ``token_id:N``) in ``vllm_runner``'s row format."""
    rows = []
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
        top = (choice.get("logprobs") or {}).get("top_logprobs") or []
        prompt = choice.get("prompt_logprobs")
        rows.append({
            "token_ids": [int(t) for t in choice["token_ids"]],
            "logprobs": [{k.removeprefix("token_id:"): float(v) for k, v in (entry or {}).items()} for entry in top],
            "prompt_logprobs": None if prompt is None else
            [None if e is None else {str(k): float(v["logprob"]) for k, v in e.items()} for e in prompt],
        })
    return rows


def _complete(server: VllmServer, model: str, prompts: list[list[int]], allowed: list[int]) -> list[dict[str, Any]]:
    reply = server.request("/v1/completions", {
        "model": model, "prompt": prompts, "max_tokens": SMOKE_MAX_TOKENS, "temperature": 0.0, "logprobs": 5,
        "prompt_logprobs": 5, "return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True,
        "allowed_token_ids": allowed})
    return _rows(reply)


def smoke_prompts(base: Path) -> list[list[int]]:
    """``verify``'s text prompts, tokenised as plain text after ``<bos>``."""
    from transformers import AutoTokenizer

    from gemma4_tune.verify.prompts import TEXT_PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return [tokenizer(p).input_ids for p in TEXT_PROMPTS]


@dataclass
class SmokeResult:
    """One served mode against the reference."""

    model: str
    greedy_agreement: float | None  # None: not measured (no reference to compare with)
    max_logprob_diff: float | None
    adapter_effect: float | None
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        """No error finding."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"model": self.model, "greedy_agreement": self.greedy_agreement,
                "max_logprob_diff": self.max_logprob_diff, "adapter_effect": self.adapter_effect, "ok": self.ok,
                "findings": [f.to_dict() for f in self.findings]}


def smoke(server: VllmServer, base: Path, references: dict[str, Any], prompts: list[list[int]],
          banned: Sequence[int], version: str) -> list[SmokeResult]:
    """One request per served model, compared with the transformers + PEFT reference of each.

    ``banned`` token ids (placeholders, EOS) are kept out of generation, as in the reference.
    """
    plan = server.plan
    vocab = json.loads((plan.model / "config.json").read_text())
    vocab = int((vocab.get("text_config") or vocab)["vocab_size"])
    allowed = [t for t in range(vocab) if t not in set(banned)]
    out: list[SmokeResult] = []
    if not plan.adapters:
        rows = _complete(server, plan.served_name, prompts, allowed)
        ref = references.get("merged")
        if ref is None:
            return [_unreferenced(plan, rows, references["base"])]
        mode = compare_mode("merged", rows, ref["lora"])
        gap = worst((mode.max_logprob_diff, mode.max_prompt_logprob_diff))
        findings = _non_finite(plan, mode)
        if not findings and plan.dtype not in LOGPROB_TOLERANCE:
            findings.append(unjudged_finding(f"vLLM serving {plan.served_name}", plan.dtype, mode.greedy_agreement,
                                             gap))
        tolerance = LOGPROB_TOLERANCE.get(plan.dtype, math.inf)
        min_agreement = MIN_AGREEMENT.get(plan.dtype, 0.0)
        if not findings and (mode.greedy_agreement < min_agreement or not (gap <= tolerance)):
            findings.append(finding(PARITY_MISMATCH.code, f"the served merged checkpoint differs from base + adapter "
                                    f"in transformers + PEFT: greedy agreement {mode.greedy_agreement:.0%}, max "
                                    f"|logprob diff| {gap:.2e} (tolerance {tolerance:.0e}, {plan.dtype})",
                                    "re-export the merged checkpoint from this adapter and base "
                                    "(gemma4-tune export --merged) and run gemma4-tune verify on it"))
        return [SmokeResult(plan.served_name, mode.greedy_agreement, gap, None, findings)]
    base_rows = _complete(server, plan.served_name, prompts, allowed)
    for name in plan.adapters:
        result = {"vllm_version": version, "max_tokens": SMOKE_MAX_TOKENS, "adapters": {name: str(plan.adapters[name])},
                  "results": {"base": base_rows, name: _complete(server, name, prompts, allowed)}}
        ref = references[name]
        parity = compare(result, {"base": ref["base"], name: ref["lora"]}, mode=name, dtype=plan.dtype,
                         k_eq_v_layers=k_eq_v_lora_layers(base, plan.adapters[name]))
        out.append(SmokeResult(name, parity.greedy_agreement, parity.max_logprob_diff, parity.adapter_effect,
                               list(parity.findings)))
    return out


def _non_finite(plan: ServePlan, mode: Any) -> list[Finding]:
    """G4T618 when the served model returned NaN or +inf logprobs: then no figure of the smoke check means anything."""
    if not mode.non_finite:
        return []
    return [non_finite_finding(f"vLLM serving {plan.served_name}", mode.non_finite, mode.values,
                               "the checkpoint holds NaN or infinite weights: export it again from the trained "
                               "adapter (`gemma4-tune export --merged`) and check it with `gemma4-tune verify`")]


def _unreferenced(plan: ServePlan, rows: list[dict[str, Any]], base_ref: list[Any]) -> SmokeResult:
    """A merged checkpoint served without its adapter: only how far it is from the base can be measured."""
    from gemma4_tune.verify.verdict import NO_EFFECT_IN_ENGINE

    mode = compare_mode("merged against the base", rows, base_ref)
    effect = worst((mode.max_logprob_diff, mode.max_prompt_logprob_diff))
    tolerance = LOGPROB_TOLERANCE.get(plan.dtype, 0.0)  # no measured bound: only an exact copy of the base fails
    broken = _non_finite(plan, mode)
    if broken:
        return SmokeResult(plan.served_name, None, None, None, broken)
    findings = [finding(SMOKE_UNREFERENCED.code, f"{plan.served_name} was compared with the base model only "
                        f"(it differs by up to {effect:.2e} in logprob, greedy tokens agree on "
                        f"{mode.greedy_agreement:.0%}): whether it behaves like the trained model was not verified",
                        "give --adapter (the one it was merged from) so --smoke compares it with base + adapter")]
    if effect <= tolerance and mode.greedy_agreement == 1.0:
        findings.append(finding(NO_EFFECT_IN_ENGINE.code, f"{plan.served_name} serves exactly like the base model "
                                f"(max |logprob diff| {effect:.2e}, within the {plan.dtype} tolerance {tolerance:.0e}): "
                                "the merge carries no fine-tune", "merge again with `gemma4-tune export --merged`"))
    return SmokeResult(plan.served_name, None, None, effect, findings)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM to this process stops the server like Ctrl-C does."""
    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(base: str | Path, adapters: Sequence[str] = (), *, merged: str | Path | None = None, port: int = 8000,
          host: str = "127.0.0.1", run_smoke: bool = False, text_only: bool = False, dtype: str | None = None,
          max_model_len: int | None = None, timeout_s: float = HEALTH_TIMEOUT_S, log: Log = print,
          on_ready: Callable[[VllmServer], None] | None = None) -> dict[str, Any]:
    """Start vLLM's OpenAI server for ``base`` + ``adapters`` (or ``merged``).

    With ``run_smoke`` it checks each served model against transformers + PEFT and stops;
    otherwise it serves until interrupted (Ctrl-C or SIGTERM). Returns what happened.
    """
    base = Path(base)
    if not merged and not adapters:
        raise FindingError(finding(NOT_SERVABLE.code, "nothing to serve: give --adapter (one or more) or --merged",
                                   "gemma4-tune serve --base BASE --adapter RUN/adapter"))
    require_vllm_python()
    scratch = engines_root() / "scratch" / "serve"
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=scratch))
    keep = False  # the work directory is kept only when a started server failed (for its log)
    try:
        plan = plan_serving(base, parse_adapters(adapters), work, merged=merged, text_only=text_only, dtype=dtype,
                            max_model_len=max_model_len)
        for note in plan.notes:
            log(f"[serve] {note}")
        server = VllmServer(plan, host=host, port=port, log_path=work / "vllm-server.log", log=log)
        log(f"[serve] starting vLLM for {plan.model} on {server.url} (~35 s on CPU, more on a fresh machine); "
            f"log: {server.log_path}")
        server.start()
        keep = True
        report: dict[str, Any] = {"url": server.url, "model": str(plan.model), "served_name": plan.served_name,
                                  "adapters": {n: str(p) for n, p in plan.adapters.items()}, "command": server.cmd,
                                  "notes": plan.notes, "findings": list(plan.findings)}
        with _terminate_as_interrupt():
            try:
                references: dict[str, Any] = {}
                prompts: list[list[int]] = []
                banned = banned_token_ids(plan.model)
                if run_smoke:
                    prompts = smoke_prompts(base)
                    log("[serve] computing the transformers + PEFT reference while the server starts")
                    if plan.reference_adapter is not None:
                        references["merged"] = hf_reference(plan.reference_base, plan.reference_adapter, prompts,
                                                            max_tokens=SMOKE_MAX_TOKENS, banned=banned,
                                                            dtype=plan.dtype)
                    elif not plan.adapters:
                        references["base"] = hf_reference(base, None, prompts, max_tokens=SMOKE_MAX_TOKENS,
                                                          banned=banned, dtype=plan.dtype)["base"]
                    for name, adapter in plan.trained.items():
                        references[name] = hf_reference(base, adapter, prompts, max_tokens=SMOKE_MAX_TOKENS,
                                                        banned=banned, dtype=plan.dtype)
                report["startup_s"] = round(server.wait_healthy(timeout_s), 1)
                log(f"[serve] ready in {report['startup_s']:.0f} s at {server.url}/v1 — served models: "
                    + ", ".join([plan.served_name, *plan.adapters]))
                log("[serve] try: " + curl_example(server, next(iter(plan.adapters), plan.served_name)))
                if on_ready is not None:
                    on_ready(server)
                if run_smoke:
                    version = server.request("/version").get("version", "?")
                    results = smoke(server, base, references, prompts, banned, version)
                    report["smoke"] = [r.to_dict() for r in results]
                    report["findings"] += [f for r in results for f in r.findings]
                    for r in results:
                        effect = "" if r.adapter_effect is None else f", adapter effect {r.adapter_effect:.2g}"
                        parity = ("parity not verified (no reference)" if r.greedy_agreement is None else
                                  f"greedy agreement {r.greedy_agreement:.0%}, max |logprob diff| "
                                  f"{r.max_logprob_diff:.1e}")
                        log(f"[serve] smoke {r.model}: {parity}{effect} — {'pass' if r.ok else 'FAIL'}")
                else:
                    log("[serve] serving; Ctrl-C (or SIGTERM) stops the server")
                    assert server.proc is not None
                    rc = server.proc.wait()
                    raise server._failure(f"exited with status {rc}")
            except KeyboardInterrupt:
                log("[serve] stopping")
            finally:
                report["stop_s"] = round(server.stop(), 1)
                log(f"[serve] server stopped in {report['stop_s']:.1f} s")
        keep = False
        report["ok"] = not any(f.severity is Severity.ERROR for f in report["findings"])
        return report
    finally:
        if keep:
            log(f"[serve] work directory kept for its log: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
