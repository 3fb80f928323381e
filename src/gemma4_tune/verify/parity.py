"""``verify``: every artefact, loaded the way its engine loads it, against the reference.

Reference: the model as trained, the base model with the adapter in PEFT (the base in 4 bits for a QLoRA adapter,
``verify.reference``), in this process. Each engine loads the
artefact on its own terms: ``peft`` (stock PEFT in a process that never imports
gemma4-tune), ``transformers`` (the merged checkpoint in stock transformers, same kind of
process) and ``vllm`` (a real vLLM in its own environment). Each comparison reports the max
|logit difference| and greedy-token agreement against a threshold for the dtype, and every
engine must show that the adapter changes the output (failure-catalog row 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from gemma4_tune.findings import Severity, finding, register
from gemma4_tune.model.quantization import QuantSpec
from gemma4_tune.verify.prompts import TEXT_PROMPTS
from gemma4_tune.verify.verdict import (
    MODALITY_NOT_RUN,
    EngineResult,
    effect_findings,
    four_bit_finding,
    non_finite_finding,
)

PARITY_FAILED = register("G4T610", Severity.ERROR, "An artefact does not reproduce the trained model", (2, 4, 7, 17))
MERGED_LOAD_REPORT = register("G4T612", Severity.ERROR, "Merged checkpoint does not load cleanly", (2, 7))
STOCK_RUN_FAILED = register("G4T613", Severity.ERROR, "A stock loader failed")
MISSING_ARTEFACT = register("G4T614", Severity.ERROR, "Verify was asked for an artefact it was not given")
UNKNOWN_ENGINE = register("G4T615", Severity.ERROR, "Unknown engine name")


ENGINES = ("peft", "transformers", "vllm", "llama.cpp")

# Max |logit difference| allowed (docs/verify.md; bench/verify_tolerances.py measures it, tests/test_tolerances.py
# keeps it within 10x). fp32: absolute; a right merged checkpoint measures at most 8.9e-5 (31B) over the four
# variants with a random LoRA, and a trained 12B adapter's right merge 2.9e-4 on image prompts with one thread
# on an AVX-512 CPU (1.3e-4 with two): the reduction order moves fp32 logits that much. A bf16/fp16 merged checkpoint rounds every merged weight to ~3 significant digits, so its bound is
# relative to the largest reference logit: right bf16 merges of the dense variants measure up to 8.0% (E2B) and
# 94.4% greedy agreement; the 26B-A4B measures 28% and 88.9% (rounding flips expert routing) and fails.
FP32_TOLERANCE = 5e-4
HALF_RELATIVE_TOLERANCE = 0.15
HALF_MIN_GREEDY_AGREEMENT = 0.9
STOCK_RUNNER = Path(__file__).parents[1] / "engines" / "stock_runner.py"


def check_engines(engines: tuple[str, ...] | list[str]) -> None:
    """Refuse an empty or unknown engine list (G4T615): comparing nothing must never pass."""
    from gemma4_tune.findings import FindingError

    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        what = f"unknown engine(s) {', '.join(map(repr, unknown))}" if unknown else "no engine was given"
        raise FindingError(finding(UNKNOWN_ENGINE.code, f"{what}: nothing would be compared",
                                   f"use a comma list of {', '.join(ENGINES)} (names are lower case)"))


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
    """The prompt modalities the adapter can change: all of them with text LoRA, image and video (its frames go
    through the vision tower) with vision-tower LoRA, audio with audio-tower LoRA (a tower runs only on its own
    media)."""
    parts = adapter_parts(adapter)
    if "text" in parts:
        return {"text", "image", "audio", "video"}
    return {m for p in parts for m in ({"vision": ("image", "video")}.get(p) or (p,))}


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


def run_stock(base: Path, adapter: Path | None, merged: Path | None, batch: dict[str, torch.Tensor],
              quant: QuantSpec | None = None) -> dict:
    """Run the stock-loader script in a fresh process that never imports gemma4-tune; ``quant``: the base loaded
    in 4 bits with these settings (stock transformers + bitsandbytes), as a QLoRA adapter was trained."""
    with tempfile.TemporaryDirectory(prefix="g4t-verify-") as tmp:
        batch_path, out_path, request = Path(tmp) / "batch.pt", Path(tmp) / "out.pt", Path(tmp) / "request.json"
        torch.save(batch, batch_path)
        request.write_text(json.dumps({"base": str(base), "adapter": str(adapter) if adapter else None,
                                       "merged": str(merged) if merged else None, "batch": str(batch_path),
                                       "out": str(out_path), "quantization": quant.bnb_kwargs() if quant else None,
                                       "experts": list(quant.experts) if quant else [],
                                       "blocksize": quant.blocksize if quant else None,
                                       "dtype": quant.load_dtype if quant else "float32"}))
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
    from gemma4_tune.verify.reference import logits_by_modality, trained_quantization

    batches = verification_batches(base, adapter=adapter)
    masks = {m: b["attention_mask"].bool() for m, b in batches.items()}
    quant = trained_quantization(adapter)
    reference = logits_by_modality(base, adapter, batches)["tuned"]  # the model as trained (4-bit base for QLoRA)
    for m in batches:
        check_reference(reference[m], masks[m], adapter)
    reach = adapter_reach(adapter)
    results: list[EngineResult] = []
    stock_needed = [e for e in engines if e in ("peft", "transformers")]
    if stock_needed:
        try:
            stock = run_stock(base, adapter if "peft" in engines else None,
                              merged if "transformers" in engines else None, batches, quant)
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
            if quant is not None:
                _original_weights_gap(results, stock, base, adapter, batches, masks, quant)
    if "vllm" in engines:
        results += vllm_results(base, adapter, merged)
    return results


def _original_weights_gap(results: list[EngineResult], stock: dict[str, Any], base: Path, adapter: Path,
                          batches: dict[str, dict[str, Any]], masks: dict[str, torch.Tensor], quant: QuantSpec) -> None:
    """A QLoRA artefact that is not the trained model (G4T610) is measured against the full-precision base + adapter
    too, and its finding (G4T619) says which of the two models it is: a merge into the original weights matches
    the second (row 38)."""
    from gemma4_tune.model.patches import peft_parametrized_is_affected
    from gemma4_tune.verify.reference import logits_by_modality

    failed = [r for r in results if any(f.code == PARITY_FAILED.code for f in r.findings)]
    if not failed:
        return
    original = logits_by_modality(base, adapter, batches, as_trained=False)["tuned"]
    for row in failed:
        m = row.modalities[0]
        gap = float((stock[row.engine][m] - original[m])[masks[m]].abs().max())
        if gap <= row.tolerance:
            cause = (f"it matches the adapter on the full-precision base (max diff {gap:.3g}): it was merged into, or "
                     "is run on, the original weights")
        else:
            cause = f"it is not the adapter on the full-precision base either (max diff {gap:.3g})"
        if row.engine == "peft" and quant.experts and peft_parametrized_is_affected():
            cause += ("; stock PEFT (this release) applies LoRA wrongly to the 4-bit MoE expert stacks: it leaves its "
                      "proxy behind and reads a cached 4-bit value without the LoRA (gemma4_tune.model.patches), so "
                      "the adapter cannot be served on the 4-bit base with stock PEFT: deploy the merged checkpoint")
        row.findings = [f for f in row.findings if f.code != PARITY_FAILED.code]
        row.findings.append(four_bit_finding(row.engine, quant, f"max diff {row.max_logit_diff:.3g}, tolerance "
                                             f"{row.tolerance:.0e}, greedy agreement {row.greedy_agreement:.1%}",
                                             cause))
        row.figures["original_weights_diff"] = gap


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
    from transformers import AutoProcessor, AutoTokenizer

    from gemma4_tune.export.vllm_adapter import k_eq_v_lora_layers, vllm_ready_adapter
    from gemma4_tune.findings import FindingError
    from gemma4_tune.verify.prompts import verified_modalities
    from gemma4_tune.verify.reference import hf_reference
    from gemma4_tune.verify.vllm import adapter_run, run_planned
    from gemma4_tune.verify.vllm_modalities import merged_run

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    modalities = verified_modalities(base, AutoProcessor.from_pretrained(str(base)), adapter)
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
        others = [m for m in modalities if m != "text"]
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
