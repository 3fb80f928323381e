"""vLLM on every modality: the merged checkpoint served with the verification prompts' images, audio and video.

vLLM 0.32 refuses LoRA on the towers (G4T201), so what a user deploys with images or audio is the
merged checkpoint. It is served as its own model by ``vllm_runner.py`` with the prompts of
``verify.prompts`` (text, two images, two audio clips, and a video for an adapter trained on video: vLLM's
own processor expands their placeholders) and compared, modality by modality, with base + adapter in
transformers + PEFT on the processed prompt: the prompt token ids (the same expansion), greedy tokens and the
log-probabilities at every prompt and generated position, at the fp32 bound for merged checkpoints
(:data:`MERGED_LOGPROB_TOLERANCE`). The
adapter's effect per modality is vLLM's merged output against the base model in transformers.

Image-token attention (failure-catalog row 31): when the image rows fail, the reference is
computed again with the other attention (``verify.reference.image_attention``); an engine that
matches it attends image tokens the other way, and the finding says so (G4T921). A modality the
engine cannot run is a warning naming the vLLM version and its error (G4T920), not a skip.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.engines.vllm_env import engines_root, require_vllm_python
from gemma4_tune.findings import Finding, FindingError, finding
from gemma4_tune.verify.prompts import SAMPLING_RATE, VerifyPrompt, by_modality, verification_prompts
from gemma4_tune.verify.reference import Reference, RefSequence, bidirectional_vision, hf_reference
from gemma4_tune.verify.verdict import IMAGE_ATTENTION_DIFFERS, MODALITY_NOT_RUN
from gemma4_tune.verify.vllm import (
    ADAPTER_NO_EFFECT,
    MIN_AGREEMENT,
    PARITY_MISMATCH,
    Log,
    ModeParity,
    PlannedRun,
    _check_cpu_shapes,
    _gap,
    _ref_effect,
    _stderr,
    banned_token_ids,
    compare_mode,
    run_planned,
)

#: Max |logprob(vLLM, merged) - logprob(base + adapter in PEFT)|, by dtype. Above the adapter path's bound
#: (``vllm.LOGPROB_TOLERANCE``): a merged checkpoint carries the merge's own fp32 rounding too, as in stock
#: transformers (``parity.FP32_TOLERANCE``). Right merges measure at most 8.4e-5 (E4B text; docs/verify.md).
MERGED_LOGPROB_TOLERANCE = {"float32": 2e-4}


@dataclass
class ModalityParity:
    """The merged checkpoint in vLLM against base + adapter in transformers + PEFT, on one modality."""

    modality: str
    prompts: int
    positions: int                 # generated + prompt positions compared
    parity: ModeParity | None      # None: the engine did not run this modality (``not_run`` says why)
    adapter_effect: float = 0.0    # max |logprob(vLLM merged) - logprob(transformers base)|, same contexts
    reference_effect: float = 0.0  # the same in transformers + PEFT (adapter on vs off)
    tolerance: float = 0.0
    not_run: str = ""
    findings: list[Finding] = field(default_factory=list)

    @property
    def max_logprob_diff(self) -> float:
        """Largest logprob difference over generated and prompt positions."""
        from gemma4_tune.verify.verdict import worst

        return worst((self.parity.max_logprob_diff, self.parity.max_prompt_logprob_diff)) if self.parity else math.nan

    @property
    def greedy_agreement(self) -> float:
        """Share of generated positions where vLLM chose the reference's token."""
        return self.parity.greedy_agreement if self.parity else 0.0


def media_prompts(prompts: Sequence[VerifyPrompt], work: Path) -> list[dict[str, Any]]:
    """The runner's form of ``prompts``: rendered text, and the media written as PNG / ``.npy`` files in ``work``
    (a video as its frames, with the metadata its timestamps come from)."""
    import numpy as np
    from PIL import Image

    out = []
    for i, p in enumerate(prompts):
        images, audios, videos = [], [], []
        for j, pixels in enumerate(p.images):
            images.append(str(work / f"prompt{i}-image{j}.png"))
            Image.fromarray(pixels).save(images[-1])
        for j, clip in enumerate(p.audios):
            audios.append(str(work / f"prompt{i}-audio{j}.npy"))
            np.save(audios[-1], clip)
        for j, (frames, meta) in enumerate(zip(p.videos, p.video_metadata(), strict=True)):
            videos.append({"frames": str(work / f"prompt{i}-video{j}.npy"),
                           "metadata": {"fps": meta.fps, "frames_indices": list(meta.frames_indices),
                                        "total_num_frames": meta.total_num_frames, "duration": meta.duration,
                                        "width": meta.width, "height": meta.height, "video_backend": "pyav"}})
            np.save(videos[-1]["frames"], frames)
        out.append({"prompt": p.text, "modality": p.modality, "images": images, "audios": audios,
                    "videos": videos, "sampling_rate": SAMPLING_RATE})
    return out


def _prompt_positions(rows: list[dict[str, Any]]) -> int:
    return sum(len(r["token_ids"]) + max(len(r.get("prompt_logprobs") or []) - 1, 0) for r in rows)


def _effect(rows: list[dict[str, Any]], base: list[RefSequence]) -> float:
    """Max |logprob(vLLM) - logprob(transformers base)| over prompt positions and the first generated one."""
    from gemma4_tune.verify.verdict import worst

    effect = 0.0
    for got, ref in zip(rows, base, strict=True):
        for i, entry in enumerate((got.get("prompt_logprobs") or [])[1:]):
            if ref.prompt_logprobs is not None and i < len(ref.prompt_logprobs):
                effect = worst((_gap(float(lp), float(ref.prompt_logprobs[i][int(t)])) for t, lp in (entry or {}).items()),
                               effect)
        if got["logprobs"]:
            effect = worst((_gap(float(lp), float(ref.logprobs[0][int(t)])) for t, lp in (got["logprobs"][0] or {}).items()),
                           effect)
    return effect


def _token_findings(where: str, rows: list[dict[str, Any]], refs: list[RefSequence],
                    prompts: list[VerifyPrompt]) -> tuple[list[Finding], list[int]]:
    """Prompts whose expansion differs between vLLM and transformers (their positions cannot be compared)."""
    out, bad = [], []
    for k, (got, ref, p) in enumerate(zip(rows, refs, prompts, strict=True)):
        want = ref.prompt_token_ids or []
        if got["prompt_token_ids"] != want:
            bad.append(k)
            out.append(finding(PARITY_MISMATCH.code, f"{where} expands prompt {p.name} to "
                               f"{len(got['prompt_token_ids'])} tokens, transformers' processor to {len(want)}: the "
                               "engine sees other placeholder counts or text, so its positions cannot be compared",
                               "check the processor files of the served checkpoint (processor_config.json, "
                               "max_soft_tokens, image_seq_length) against the base model's", prompt=p.name,
                               vllm_tokens=len(got["prompt_token_ids"]), transformers_tokens=len(want)))
    return out, bad


def compare_modality(modality: str, where: str, rows: list[dict[str, Any]], reference: Reference,
                     prompts: list[VerifyPrompt], *, dtype: str = "float32") -> ModalityParity:
    """Figures and findings of the merged checkpoint's ``rows`` (one modality) against ``reference``."""
    from gemma4_tune.verify.verdict import non_finite_finding, worst

    tolerance = MERGED_LOGPROB_TOLERANCE[dtype]
    findings, bad = _token_findings(where, rows, reference["lora"], prompts)
    keep = [k for k in range(len(rows)) if k not in bad]
    rows_k = [rows[k] for k in keep]
    lora_k, base_k = [reference["lora"][k] for k in keep], [reference["base"][k] for k in keep]
    parity = compare_mode("merged", rows_k, lora_k)
    result = ModalityParity(modality, len(rows), _prompt_positions(rows_k), parity, _effect(rows_k, base_k),
                            _ref_effect(base_k, lora_k) if keep else 0.0, tolerance)
    if parity.non_finite:
        result.findings = [*findings, non_finite_finding(f"{where}, {modality} prompts", parity.non_finite,
                                                         parity.values, "the merged checkpoint holds NaN or "
                                                         "infinite weights: export it again from the adapter")]
        return result
    gap = worst((parity.max_logprob_diff, parity.max_prompt_logprob_diff))
    if parity.greedy_agreement < MIN_AGREEMENT[dtype] or not (gap <= tolerance):
        findings.append(finding(PARITY_MISMATCH.code, f"{where} on {modality} prompts differs from base + adapter in "
                                f"transformers + PEFT: max |logprob diff| {gap:.2e} (tolerance {tolerance:.0e}, "
                                f"{dtype}), greedy agreement {parity.greedy_agreement:.0%}",
                                _fix(modality), modality=modality, max_logprob_diff=gap,
                                greedy_agreement=parity.greedy_agreement))
    if result.reference_effect > tolerance and not (result.adapter_effect > tolerance):
        findings.append(finding(ADAPTER_NO_EFFECT.code, f"{where} on {modality} prompts is the base model's output "
                                f"(logprobs move by at most {result.adapter_effect:.1e}; the adapter moves them by "
                                f"{result.reference_effect:.2g} in transformers + PEFT)",
                                "the merged checkpoint lost the fine-tune: merge again with `gemma4-tune export "
                                "--merged`", modality=modality, adapter_effect=result.adapter_effect))
    result.findings = findings
    return result


def _fix(modality: str) -> str:
    if modality == "text":
        return ("the merged weights differ from base + adapter: export again with `gemma4-tune export --merged` "
                "and check the key set (`gemma4-tune verify --engine transformers`)")
    tower = {"image": "vision", "video": "vision", "audio": "audio"}.get(modality, modality)
    return (f"the {tower} tower of the merged checkpoint differs from base + adapter (its deltas dropped, or the "
            f"tower's clamps lost: catalog rows 2 and 31): check `gemma4-tune verify --engine transformers` on the "
            "same checkpoint; if transformers passes, the engine runs this modality differently")


def diagnose_attention(result: ModalityParity, where: str, rows: list[dict[str, Any]], other: Reference,
                       engine_bidirectional: bool) -> None:
    """Image rows that fail but match the reference computed with the other image attention: say so (G4T921)."""
    from gemma4_tune.verify.reference import attention_name
    from gemma4_tune.verify.verdict import worst

    if result.modality != "image" or result.parity is None or not any(
            f.code == PARITY_MISMATCH.code for f in result.findings):
        return
    if any(r["prompt_token_ids"] != o.prompt_token_ids for r, o in zip(rows, other["lora"], strict=True)):
        return
    alt = compare_mode("merged", rows, other["lora"])
    gap = worst((alt.max_logprob_diff, alt.max_prompt_logprob_diff))
    if alt.greedy_agreement >= 1.0 and gap <= result.tolerance:
        engine, ours = attention_name(engine_bidirectional), attention_name(not engine_bidirectional)
        result.findings = [f for f in result.findings if f.code != PARITY_MISMATCH.code]
        result.findings.append(finding(
            IMAGE_ATTENTION_DIFFERS.code, f"{where} attends image tokens {engine}ly where the reference "
            f"(transformers) attends them {ours}ly: transformers with {engine} image attention reproduces the engine "
            f"(max |logprob diff| {gap:.1e}); with {ours} attention the engine is off by {result.max_logprob_diff:.2e}",
            "use an engine release that masks Gemma 4 image tokens as transformers does (vllm#40534, #47217; "
            "llama.cpp#28318), or check which side changed (transformers#46850)", engine_attention=engine,
            reference_attention=ours, max_logprob_diff_other=gap))


def merged_run(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, *,
               prompts: list[VerifyPrompt] | None = None, max_tokens: int = 8, logprobs: int = 5,
               flip_reference: bool = False, log: Log | None = None) -> tuple[PlannedRun, Callable[[], None]]:
    """The planned vLLM run of the merged checkpoint on every modality of the model.

    Its ``finish`` gives ``{modality: ModalityParity}``. ``flip_reference`` computes the reference with the
    image attention the model does not use (what a test of the diagnosis needs). Also returns the clean-up
    of the media files, to call once the run is over.
    """
    from transformers import AutoProcessor

    from gemma4_tune.verify.prompts import processed
    from gemma4_tune.verify.vllm import _max_model_len

    log = log or _stderr
    base_dir, adapter_dir, merged_dir = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    require_vllm_python()
    _check_cpu_shapes(merged_dir)
    processor = AutoProcessor.from_pretrained(str(base_dir))
    prompts = verification_prompts(base_dir, processor, adapter_dir) if prompts is None else list(prompts)
    longest = max(processed(processor, [p])["input_ids"].shape[1] for p in prompts)
    media = engines_root() / "scratch" / "media"
    media.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="verify-media-", dir=media))
    banned = banned_token_ids(base_dir)
    request = {"model": str(merged_dir.resolve()), "prompts": media_prompts(prompts, work), "max_tokens": max_tokens,
               "logprobs": logprobs, "prompt_logprobs": logprobs, "dtype": "float32",
               "max_model_len": _max_model_len(merged_dir, longest, max_tokens), "banned_token_ids": banned}
    refs: dict[str, Reference] = {}

    def reference(flip: bool) -> Reference:
        key = "flipped" if flip else "model"
        if key not in refs:
            log(f"[vllm] computing the transformers + PEFT reference on {len(prompts)} prompts "
                f"({', '.join(by_modality(prompts))}){' with the other image attention' if flip else ''}")
            refs[key] = hf_reference(base_dir, adapter_dir, prompts, max_tokens=max_tokens, banned=banned,
                                     flip_image_attention=flip)
        return refs[key]

    def finish(result: dict[str, Any]) -> dict[str, ModalityParity]:
        where = f"vLLM {result.get('vllm_version', '?')} serving the merged checkpoint"
        rows = result["results"]["base"]
        ref = reference(flip_reference)
        out: dict[str, ModalityParity] = {}
        errors = dict(result.get("errors") or {})
        for modality, group in by_modality(prompts).items():
            index = [i for i, p in enumerate(prompts) if p.modality == modality]
            got = [r for r in rows if r["modality"] == modality]
            if modality in errors or len(got) != len(index):
                cause = errors.get(modality) or next(iter(errors.values()), "the engine stopped before it")
                out[modality] = ModalityParity(modality, 0, 0, None, not_run=cause, findings=[finding(
                    MODALITY_NOT_RUN.code, f"vLLM {result.get('vllm_version', '?')} could not run the {modality} "
                    f"prompts of the merged checkpoint ({cause.splitlines()[0][:300]}): {modality} is not verified "
                    "in this engine", f"verify {modality} where it runs (`--engine transformers`, llama.cpp), or on "
                    "a vLLM build that runs it (a CUDA machine)", modality=modality, vllm_version=result.get(
                        "vllm_version"), cause=cause)])
                continue
            sub = {mode: [ref[mode][i] for i in index] for mode in ("lora", "base")}
            parity = compare_modality(modality, where, got, sub, group)
            if modality == "image" and any(f.code == PARITY_MISMATCH.code for f in parity.findings):
                other = reference(not flip_reference)
                engine_bidirectional = bidirectional_vision(base_dir) != (not flip_reference)
                diagnose_attention(parity, where, got, {"lora": [other["lora"][i] for i in index]},
                                   engine_bidirectional)
            log(f"[vllm] merged, {modality}: max |logprob diff| {parity.max_logprob_diff:.1e}, greedy agreement "
                f"{parity.greedy_agreement:.0%}, effect {parity.adapter_effect:.2g} ({len(parity.findings)} findings)")
            out[modality] = parity
        return out

    planned = PlannedRun(request, lambda: reference(flip_reference), finish, what=f"{merged_dir} (merged)")
    return planned, lambda: shutil.rmtree(work, ignore_errors=True)


def vllm_merged_parity(base_dir: str | Path, adapter_dir: str | Path, merged_dir: str | Path, *,
                       prompts: list[VerifyPrompt] | None = None, max_tokens: int = 8, flip_reference: bool = False,
                       log: Log | None = None) -> dict[str, ModalityParity]:
    """Serve ``merged_dir`` in a real vLLM with every modality's verification prompts; compare with
    ``base_dir`` + ``adapter_dir`` in transformers + PEFT, per modality. Raises G4T904/G4T905 as ``vllm_parity``."""
    planned, clean = merged_run(base_dir, adapter_dir, merged_dir, prompts=prompts, max_tokens=max_tokens,
                                flip_reference=flip_reference, log=log)
    try:
        (out,) = run_planned([planned], log=log)
    finally:
        clean()
    if isinstance(out, FindingError):
        raise out
    return out
