"""``verify``: every artefact, loaded the way its engine loads it, against the reference.

Reference: the base model with the adapter in PEFT, in this process. Each engine loads the
artefact on its own terms: ``peft`` (stock PEFT in a process that never imports
gemma4-tune), ``transformers`` (the merged checkpoint in stock transformers, same kind of
process) and ``vllm`` (a real vLLM in its own environment). Each comparison reports the max
|logit difference| and greedy-token agreement against a threshold for the dtype, and every
engine must show that the adapter changes the output (failure-catalog row 4).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemma4_tune.findings import Finding, Severity, finding, register
from gemma4_tune.verify.prompts import TEXT_PROMPTS

PARITY_FAILED = register("G4T610", Severity.ERROR, "An artefact does not reproduce the trained model", (2, 4, 7, 17))
NO_EFFECT_IN_ENGINE = register("G4T611", Severity.ERROR, "The adapter changes nothing in an engine", (4,))
MERGED_LOAD_REPORT = register("G4T612", Severity.ERROR, "Merged checkpoint does not load cleanly", (2, 7))
STOCK_RUN_FAILED = register("G4T613", Severity.ERROR, "A stock loader failed")
MISSING_ARTEFACT = register("G4T614", Severity.ERROR, "Verify was asked for an artefact it was not given")
UNKNOWN_ENGINE = register("G4T615", Severity.ERROR, "Unknown engine name")
NOTHING_COMPARED = register("G4T616", Severity.ERROR, "An engine compared nothing")
BARELY_MOVES = register("G4T617", Severity.WARNING, "The adapter barely moves the model", (4,))
NON_FINITE_OUTPUT = register("G4T618", Severity.ERROR, "An output holds NaN or infinite values")
MODALITY_NOT_RUN = register("G4T920", Severity.WARNING, "An engine cannot run a modality of this model", (31,))
IMAGE_ATTENTION_DIFFERS = register("G4T921", Severity.ERROR, "An engine attends image tokens differently from "
                                   "transformers", (31,))

#: An adapter effect above the parity tolerance but below this many tolerances, or below this share of the
#: reference's logit scale, is reported as barely moving the model (a warning: too little training, a tiny lr).
BARELY_TOLERANCES = 10
BARELY_SCALE = 1e-3

ENGINES = ("peft", "transformers", "vllm", "llama.cpp")

# Max |logit difference| allowed (docs/verify.md; bench/verify_tolerances.py measures it, tests/test_tolerances.py
# keeps it within 10x). fp32: absolute; a right merged checkpoint measures at most 6.7e-5 (31B) over the four
# variants. A bf16/fp16 merged checkpoint rounds every merged weight to ~3 significant digits, so its bound is
# relative to the largest reference logit: right bf16 merges of the dense variants measure up to 8.0% (E2B) and
# 94.4% greedy agreement; the 26B-A4B measures 28% and 88.9% (rounding flips expert routing) and fails.
FP32_TOLERANCE = 2e-4
HALF_RELATIVE_TOLERANCE = 0.15
HALF_MIN_GREEDY_AGREEMENT = 0.9
STOCK_RUNNER = Path(__file__).parents[1] / "engines" / "stock_runner.py"


@dataclass
class EngineResult:
    """One engine's comparison with the reference."""

    engine: str
    max_logit_diff: float
    greedy_agreement: float
    adapter_effect: float
    tolerance: float
    findings: list[Finding] = field(default_factory=list)
    criterion: str = ""  # the pass rule in words where it is not a max |logit diff| (GGUF types: KL)
    prompts: int = 0  # what was compared: prompts, token positions, and the modalities they held
    positions: int = 0
    modalities: list[str] = field(default_factory=list)
    not_run: str = ""  # why the engine could not run this row's prompts (its finding says so); not a pass
    figures: dict[str, Any] = field(default_factory=dict, repr=False)  # the engine's own figures for this row

    @property
    def verdict(self) -> str:
        """``pass``, ``FAIL`` or ``not run``, for tables."""
        return "FAIL" if not self.ok else ("not run" if self.not_run else "pass")

    @property
    def compared(self) -> str:
        """``4 prompts, 75 positions (text, image)``: what the verdict rests on."""
        kinds = f" ({', '.join(self.modalities)})" if self.modalities else ""
        return f"{self.prompts} prompts, {self.positions} positions{kinds}"

    @property
    def rule(self) -> str:
        """What the comparison had to meet, for tables."""
        return self.criterion or f"{self.tolerance:.0e}"

    @property
    def ok(self) -> bool:
        """No error findings."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        figures = data.pop("figures")
        data["reference_effect"] = figures.get("reference_effect")  # the adapter's effect in transformers + PEFT
        data["findings"] = [f.to_dict() for f in self.findings]
        data["ok"] = self.ok
        data["rule"] = self.rule
        data["compared"] = self.compared
        data["verdict"] = self.verdict
        return data


def summarize(rows: list[EngineResult]) -> dict[str, Any]:
    """One engine's modality rows as one verdict: the worst difference, the smallest effect, what was compared."""
    kinds = [m for r in rows for m in r.modalities]
    return {"ok": all(r.ok for r in rows), "max_logit_diff": worst(r.max_logit_diff for r in rows),
            "adapter_effect": min((r.adapter_effect for r in rows), default=0.0),
            "compared": f"{sum(r.prompts for r in rows)} prompts, {sum(r.positions for r in rows)} positions "
                        f"({', '.join(kinds)})", "rows": [r.to_dict() for r in rows]}


def report_findings(rows: list[EngineResult]) -> list[Finding]:
    """The rows' findings with one problem said once: a code an engine raises on several modality rows becomes
    one finding that names them (each row keeps its own, for its verdict)."""
    from dataclasses import replace

    groups: dict[tuple[str, str], list[tuple[EngineResult, Finding]]] = {}
    for row in rows:
        for f in row.findings:
            groups.setdefault((row.engine, f.code), []).append((row, f))
    out = []
    for items in groups.values():
        first_row, first = items[0]
        if len(items) == 1:
            out.append(first)
            continue
        kinds = [m for row, _ in items for m in row.modalities]
        out.append(replace(first, message=f"{first.message} [{first_row.engine}: the same on {len(items)} rows, "
                                          f"{', '.join(kinds)}; each row's figures in verify.md]",
                           details={**first.details, "modalities": kinds, "rows": len(items)}))
    return out


def effect_findings(engine: str, effect: float, tolerance: float, scale: float = 0.0) -> list[Finding]:
    """Whether the adapter changes ``engine``'s output: an error when the change is within the parity tolerance
    (it cannot be told from noise: the adapter does nothing), a warning when it is within a small factor of it or
    a tiny share of the logit ``scale``. The one rule every engine's verdict uses (row 4)."""
    if not (effect > tolerance):  # within the tolerance, or NaN: nothing shown to change
        return [finding(NO_EFFECT_IN_ENGINE.code, f"{engine}: with the adapter the output moves by at most "
                        f"{effect:.3g}, within the parity tolerance {tolerance:.0e}: the adapter changes nothing",
                        "check that lora_B is not all zeros (was the adapter saved after training?)",
                        adapter_effect=effect, tolerance=tolerance)]
    floor = max(BARELY_TOLERANCES * tolerance, BARELY_SCALE * scale)
    if effect < floor:
        return [finding(BARELY_MOVES.code, f"{engine}: the adapter moves the output by only {effect:.3g} (under "
                        f"{floor:.2g}: {BARELY_TOLERANCES} x the parity tolerance {tolerance:.0e}"
                        + (f", or {BARELY_SCALE:g} of the logit scale {scale:.3g}" if scale else "") + ")",
                        "check that training ran long enough to change the model (metrics.jsonl, the report's "
                        "samples); a very small learning rate or few steps leave the adapter near zero",
                        adapter_effect=effect, floor=floor)]
    return []


def worst(values: Any, start: float = 0.0) -> float:
    """The largest of ``values`` (and ``start``), NaN if any is NaN: Python's ``max`` keeps the first of two
    values whenever the comparison is false, so a NaN that is not first would vanish from a running maximum."""
    out = start
    for value in values:
        value = float(value)
        if math.isnan(value) or math.isnan(out):
            return math.nan
        out = max(out, value)
    return out


def non_finite_finding(what: str, count: int, total: int, fix: str, unit: str = "output values") -> Finding:
    """G4T618: ``count`` of ``total`` ``unit`` of ``what`` are NaN or infinite. Such a comparison proves
    nothing either way (NaN compares false with every bound), so it fails on its own finding."""
    return finding(NON_FINITE_OUTPUT.code, f"{what}: NaN or infinite in {count} of {total} {unit}, so nothing "
                   "can be compared", fix, non_finite=count, values=total)


def check_engines(engines: tuple[str, ...] | list[str]) -> None:
    """Refuse an empty or unknown engine list (G4T615): comparing nothing must never pass."""
    from gemma4_tune.findings import FindingError

    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        what = f"unknown engine(s) {', '.join(map(repr, unknown))}" if unknown else "no engine was given"
        raise FindingError(finding(UNKNOWN_ENGINE.code, f"{what}: nothing would be compared",
                                   f"use a comma list of {', '.join(ENGINES)} (names are lower case)"))


def require_comparisons(results: list[EngineResult]) -> None:
    """Each engine row must rest on something: zero prompts or positions is an error (G4T616), never a pass."""
    for result in results:
        if (result.prompts <= 0 or result.positions <= 0) and result.ok and not result.not_run:  # a failed or
            # not-run row already says why
            result.findings.append(finding(NOTHING_COMPARED.code, f"{result.engine}: compared "
                                           f"{result.compared}, so it verified nothing",
                                           "run verify again; if it persists, report it with verify.json"))


def fixed_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    """The text prompts and one image prompt (models with a vision tower) in one batch: the training-time
    reload check (``verify.peft``). ``verify`` itself runs every modality's prompts (``verify.prompts``)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    texts = [processor.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in TEXT_PROMPTS]
    images = None
    if config.get("vision_config"):
        rng = np.random.default_rng(0)
        picture = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
        texts.append(processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            add_generation_prompt=True, tokenize=False))
        images = [[]] * len(TEXT_PROMPTS) + [[picture]]
    kwargs = {"images": images} if images else {}
    return dict(processor(text=texts, return_tensors="pt", padding=True, padding_side="right", **kwargs))


def checkpoint_is_half(model_dir: Path) -> bool:
    """Whether the checkpoint stores (some of) its weights in bf16/fp16: merged weights were rounded."""
    from gemma4_tune.export.manifest import read_checkpoint

    return any(t.dtype in ("BF16", "F16") for t in read_checkpoint(model_dir).values())


def adapter_parts(adapter: Path) -> set[str]:
    """The parts of the model (``model.profile.part_of``: text, vision, audio) the adapter's tensors are in."""
    from safetensors import safe_open

    from gemma4_tune.model.profile import part_of

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return {part_of(k) for k in f.keys()}  # noqa: SIM118


def adapter_reach(adapter: Path) -> set[str]:
    """The prompt modalities the adapter can change: all of them with text LoRA, image with vision-tower LoRA,
    audio with audio-tower LoRA (a tower runs only on its own media)."""
    parts = adapter_parts(adapter)
    return {"text", "image", "audio"} if "text" in parts else {{"vision": "image"}.get(p, p) for p in parts}


def _compare(engine: str, got: torch.Tensor, reference: torch.Tensor, base: torch.Tensor,
             mask: torch.Tensor, half: bool = False, modalities: list[str] | None = None,
             judge_effect: bool = True) -> EngineResult:
    diff = float((got - reference)[mask].abs().max())
    agreement = float((got.argmax(-1) == reference.argmax(-1))[mask].float().mean())
    effect = float((got - base)[mask].abs().max())
    tolerance = HALF_RELATIVE_TOLERANCE * float(reference[mask].abs().max()) if half else FP32_TOLERANCE
    result = EngineResult(engine, diff, agreement, effect, tolerance, prompts=int(mask.any(-1).sum()),
                          positions=int(mask.sum()), modalities=list(modalities or ["text"]))
    bad = int((~torch.isfinite(got[mask])).sum())
    if bad:  # the cause: the parity and effect figures it makes NaN are not findings of their own
        result.findings.append(non_finite_finding(
            f"{engine}: the artefact's logits", bad, int(got[mask].numel()),
            "the artefact holds NaN or infinite weights (a diverged run, a broken conversion): re-export it from "
            "the trained adapter with `gemma4-tune export`, and check the adapter with `gemma4-tune verify "
            "--engine peft`"))
        return result
    if half and agreement < HALF_MIN_GREEDY_AGREEMENT:
        result.findings.append(finding(PARITY_FAILED.code, f"{engine}: greedy tokens agree on only {agreement:.1%} "
                                       f"of positions (at least {HALF_MIN_GREEDY_AGREEMENT:.0%} expected)",
                                       "check that the artefact was exported from this adapter and base"))
    if not (diff <= tolerance):  # NaN compares false everywhere: a NaN difference must fail, never pass
        result.findings.append(finding(PARITY_FAILED.code, f"{engine}: logits differ from the trained model by "
                                       f"{diff:.3g} (tolerance {tolerance:.0e}), greedy agreement {agreement:.1%}",
                                       "check that the artefact was exported from this adapter and base; "
                                       "re-export with `gemma4-tune export`"))
    if judge_effect:  # rows of a modality the adapter cannot reach show its effect without judging it
        result.findings += effect_findings(engine, effect, tolerance, float(reference[mask].abs().max()))
    return result


def check_reference(reference: torch.Tensor, mask: torch.Tensor, adapter: Path) -> None:
    """The trained model itself (base + adapter in PEFT) must give finite logits: against NaN nothing verifies."""
    from gemma4_tune.findings import FindingError

    bad = int((~torch.isfinite(reference[mask])).sum())
    if bad:
        raise FindingError(non_finite_finding(
            f"the trained model (base + {adapter} in PEFT)", bad, int(reference[mask].numel()),
            "the adapter holds NaN or infinite weights (the run diverged: train again with a lower --lr, and read "
            "the run's G4T403 findings); there is nothing right to compare the artefacts with"))


def run_stock(base: Path, adapter: Path | None, merged: Path | None, batch: dict[str, torch.Tensor]) -> dict:
    """Run the stock-loader script in a fresh process that never imports gemma4-tune."""
    with tempfile.TemporaryDirectory(prefix="g4t-verify-") as tmp:
        batch_path, out_path, request = Path(tmp) / "batch.pt", Path(tmp) / "out.pt", Path(tmp) / "request.json"
        torch.save(batch, batch_path)
        request.write_text(json.dumps({"base": str(base), "adapter": str(adapter) if adapter else None,
                                       "merged": str(merged) if merged else None, "batch": str(batch_path),
                                       "out": str(out_path)}))
        threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the count this process chose (threads.py)
        proc = subprocess.run([sys.executable, "-P", str(STOCK_RUNNER), str(request)], capture_output=True,
                              text=True, timeout=3600, env={**os.environ, **threads})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        out = torch.load(out_path)
        if out.get("foreign_modules"):
            raise RuntimeError(f"the stock loader's process imported {', '.join(out['foreign_modules'])}")
        return out


def verify_artefacts(base: Path, adapter: Path, merged: Path | None, engines: list[str]) -> list[EngineResult]:
    """Compare each requested engine's view of the artefacts with the reference."""
    from gemma4_tune.findings import FindingError

    if "transformers" in engines and merged is None:
        raise FindingError(finding(MISSING_ARTEFACT.code, "--engine transformers checks the merged checkpoint, "
                                   "but no --merged was given", "pass --merged DIR (make one with "
                                   "`gemma4-tune export --merged DIR`) or drop transformers from --engine"))
    check_engines(engines)
    from gemma4_tune.verify.prompts import batches as verification_batches
    from gemma4_tune.verify.reference import logits_by_modality

    batches = verification_batches(base)
    masks = {m: b["attention_mask"].bool() for m, b in batches.items()}
    reference = logits_by_modality(base, adapter, batches)["tuned"]
    for m in batches:
        check_reference(reference[m], masks[m], adapter)
    reach = adapter_reach(adapter)
    results: list[EngineResult] = []
    stock_needed = [e for e in engines if e in ("peft", "transformers")]
    if stock_needed:
        try:
            stock = run_stock(base, adapter if "peft" in engines else None,
                              merged if "transformers" in engines else None, batches)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results.append(EngineResult(",".join(stock_needed), float("nan"), 0.0, 0.0, 0.0, [finding(
                STOCK_RUN_FAILED.code, f"the stock loader failed: {exc}", "read the error above; the artefact "
                "does not load with stock transformers/PEFT")]))
            stock = None
        if stock is not None:
            for engine in stock_needed:
                half = engine == "transformers" and checkpoint_is_half(merged)
                info = stock.get("merged_loading_info") if engine == "transformers" else None
                for m in batches:
                    result = _compare(engine, stock[engine][m], reference[m], stock["base"][m], masks[m], half, [m],
                                      judge_effect=m in reach)
                    if info and any(info.values()):  # the root cause: the logit gap it causes is not a second
                        # finding; every row fails on it, and report_findings says it once
                        result.findings = [f for f in result.findings if f.code != PARITY_FAILED.code]
                        result.findings.append(finding(
                            MERGED_LOAD_REPORT.code, f"the merged checkpoint loads with a loading report: "
                            f"{ {k: v[:3] for k, v in info.items() if v} }", "re-export it (every official key "
                            "must be present and named as in the base: tower .linear.weight, clamp buffers); one "
                            "saved from unwrapped towers is put back exactly by `gemma4-tune repair --base "
                            f"{base} --merged {merged} --adapter {adapter} --out DIR`"))
                    results.append(result)
    if "vllm" in engines:
        results += vllm_results(base, adapter, merged)
    return results


def text_only_adapter(adapter: Path, out: Path) -> Path:
    """The adapter without its tower and multimodal-embedder tensors (what vLLM loads without its tower flag);
    the same split (``model.profile.part_of``) that export reports and serve --text-only serves."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gemma4_tune.model.profile import part_of

    shutil.copytree(adapter, out)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if part_of(k) == "text"},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def vllm_results(base: Path, adapter: Path, merged: Path | None) -> list[EngineResult]:
    """A real vLLM (its own environment) against transformers + PEFT: the adapter on the text prompts, and
    with ``merged`` the merged checkpoint on every modality's prompts (``verify.vllm_modalities``), in one
    runner process."""
    from transformers import AutoTokenizer

    from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers, vllm_ready_adapter
    from gemma4_tune.findings import FindingError
    from gemma4_tune.verify.prompts import model_modalities
    from gemma4_tune.verify.reference import hf_reference
    from gemma4_tune.verify.vllm import adapter_run, run_planned
    from gemma4_tune.verify.vllm_modalities import merged_run

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    # plain text after <bos>: vLLM's check bans placeholder and end-of-turn ids, which chat prompts contain
    prompts = [tokenizer(p).input_ids for p in TEXT_PROMPTS]
    rows: list[EngineResult] = []
    with tempfile.TemporaryDirectory(prefix="g4t-vllm-") as tmp:
        served, notes = adapter, []
        if adapter_parts(adapter) - {"text"}:  # vLLM 0.32 refuses tower LoRA (G4T201): serve its text part
            served, notes = text_only_adapter(adapter, Path(tmp) / "adapter-text"), ["text LoRA only"]
        if k_eq_v_lora_layers(base, served):  # what users deploy on K=V models (G4T210)
            served, notes = vllm_ready_adapter(served, base, Path(tmp) / "adapter-vllm"), [*notes, "vLLM-ready"]
        name = "vllm adapter" + (f" ({', '.join(notes)})" if notes else "")
        # the reference is always the trained adapter in transformers + PEFT; on text prompts the towers
        # do not run, so the text part served alone must reproduce it exactly
        try:
            planned = [adapter_run(base, {"lora": served}, prompts, reference=lambda base_dir, _served, ids, **kw:
                                   hf_reference(base_dir, adapter, ids, **kw))]
            clean = None
            if merged is not None:
                run, clean = merged_run(base, adapter, merged)
                planned.append(run)
            try:
                outcome = run_planned(planned)
            finally:
                if clean is not None:
                    clean()
        except FindingError as exc:  # the engine refused or died: a failed row in the table, not a crash
            return [EngineResult(name, float("nan"), 0.0, 0.0, 0.0, list(exc.findings))]
    parity = outcome[0]
    if isinstance(parity, FindingError):
        rows.append(EngineResult(name, float("nan"), 0.0, 0.0, 0.0, list(parity.findings), modalities=["text"]))
    else:
        parity = parity["lora"]
        rows.append(EngineResult(name, parity.max_logprob_diff, parity.greedy_agreement, parity.adapter_effect,
                                 parity.tolerance, list(parity.findings), prompts=parity.prompts,
                                 positions=parity.lora.positions, modalities=["text"]))
    if merged is None:
        others = [m for m in model_modalities(base) if m != "text"]
        if others:
            rows[0].findings.append(finding(MODALITY_NOT_RUN.code, f"vLLM verified the adapter on text prompts only: "
                                            f"{' and '.join(others)} are verified in vLLM on the merged checkpoint "
                                            "(vLLM 0.32 serves no tower LoRA), which was not given",
                                            "pass --merged DIR (made by `gemma4-tune export --merged DIR`)",
                                            modalities=others))
        return rows
    merged_out = outcome[1]
    if isinstance(merged_out, FindingError):
        return [*rows, EngineResult("vllm merged", float("nan"), 0.0, 0.0, 0.0, list(merged_out.findings))]
    for modality, m in merged_out.items():
        rows.append(EngineResult("vllm merged", m.max_logprob_diff, m.greedy_agreement, m.adapter_effect, m.tolerance,
                                 list(m.findings), prompts=m.prompts, positions=m.positions, modalities=[modality],
                                 not_run=m.not_run, figures={"reference_effect": m.reference_effect}))
    return rows
