"""The Python API under the CLI; other trainers call these."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import OUTPUT_EXISTS, FindingError, Severity, finding, has_errors
from gemma4_tune.io import (
    atomic_directory,
    check_free_space,
    check_writable,
    output_errors,
    write_json,
    write_text_atomic,
)
from gemma4_tune.model.catalog import resolve_variant
from gemma4_tune.plan.adapters import LoraSettings, prepare_model
from gemma4_tune.plan.overview import meta_model, plan

if TYPE_CHECKING:  # the Trainer stack costs ~5 s and ~230 MB to import; export and verify never need it
    from gemma4_tune.preflight import PreflightResult
    from gemma4_tune.train.base import TrainResult

__all__ = ["LoraSettings", "RunConfig", "export", "meta_model", "plan", "prepare_model", "run_preflight",
           "run_training", "tiny_model", "verify"]


def tiny_model(variant: str, out: str | Path, *, seed: int = 0, template_revision: str = "v5",
               dtype: str = "float32") -> Path:
    """Write a tiny random Gemma 4 shaped like ``variant`` to ``out`` (atomically); return the path."""
    from gemma4_tune.data.chat import REVISIONS, official_template
    from gemma4_tune.data.collate import UNKNOWN_REVISION
    from gemma4_tune.model.tiny import build_tiny_model

    spec = resolve_variant(variant)
    if template_revision not in REVISIONS:
        raise FindingError(finding(UNKNOWN_REVISION.code, f"unknown chat template revision {template_revision!r}",
                                   f"use one of {', '.join(REVISIONS)} (v5 is the newest official revision)"))
    template = official_template(template_revision)
    out = Path(out)
    check_writable(out, "--out", whole=True)
    with output_errors(out, "the tiny model"), atomic_directory(out) as tmp:
        build_tiny_model(spec, tmp, seed=seed, chat_template=template, dtype=dtype)
    return out


def run_training(cfg: RunConfig) -> TrainResult:
    """Train, prove the saved adapter reproduces the trained model, and write the report.

    Writes report.json, report.md, report.html and loss.png beside the adapter (and the method's own section and
    plot); raises FindingError (after writing the report) when the saved adapter does not reproduce the model or
    changes nothing.
    """
    from gemma4_tune.ranks import is_main_process
    from gemma4_tune.report.run_report import write_report
    from gemma4_tune.train.base import STAGING, library_versions
    from gemma4_tune.train.methods import get
    from gemma4_tune.train.run import train

    out = Path(cfg.out)
    with output_errors(out, "the run's checkpoints, adapter and records", cleanup=[out / STAGING]):
        result = train(cfg)
    if not is_main_process():
        return result
    # the saved adapter against the trained model, where the run kept a batch to compare them on (SFT's; TRL's
    # preference trainers keep none)
    verification = _verify_saved_adapter(cfg, result) if result.probe_batch else None
    with output_errors(result.out, "the run's report"):
        part = get(cfg.method).report_section(cfg, result)
        report = {"summary": part.summary, "config": cfg.dump(), "data": result.data,
                  "plan": {"spec": result.plan.spec, "trainable": result.plan.trainable_by_group(),
                           "skipped": len(result.plan.skipped)},
                  "preflight": result.preflight.to_dict() if result.preflight else None}
        if verification is not None:
            report["verification"] = verification
        report.update(part.sections)
        if part.section is not None:  # report.json[<method>], e.g. DPO's held-out rewards, and its plot
            report[cfg.method] = {**part.section, "plot": part.plot.name if part.plot else None}
        report.update({"samples": [s.to_dict() for s in result.samples], "metrics": result.metrics,
                       "timings": {"run seconds": result.seconds}, "versions": library_versions()})
        result.report = report
        write_report(result.out, result.report, result.findings)
    if has_errors(result.findings):
        raise FindingError(*[f for f in result.findings if f.severity is Severity.ERROR])
    return result


def _verify_saved_adapter(cfg: RunConfig, result: TrainResult) -> dict[str, Any]:
    """The saved adapter reloaded (or its tensors read back) against the trained model in memory; its findings join
    the run's, the parity is kept on ``result.parity``. The report's ``verification`` section."""
    from gemma4_tune.verify.peft import saved_adapter_parity, saved_tensor_parity

    parity = tensors = None
    # sharded runs, and 4-bit MoE experts (PEFT loads no second adapter onto a parametrized expert stack): the saved
    # tensors against the trained ones; `verify` compares the saved adapter's logits on a fresh 4-bit base
    four_bit_experts = result.quant is not None and bool(result.quant.experts)
    if result.adapter is not None and (result.trained_state or four_bit_experts):
        from gemma4_tune.export.manifest import check_adapter_matches_base

        tensors = saved_tensor_parity(result.adapter, result.model, result.trained_state or None)
        result.findings += tensors.findings()
        try:  # every adapted module must exist in the base: the keys PEFT will load them by
            check_adapter_matches_base(result.adapter, cfg.model)
        except FindingError as exc:
            result.findings += exc.findings
    elif result.adapter is not None:
        parity = saved_adapter_parity(result.adapter, result.model, result.probe_batch)
        result.findings += parity.findings()
    result.parity = parity
    return {"peft_reload": parity.to_dict() if parity else None,
            "saved_tensors": tensors.to_dict() if tensors else None}


def run_preflight(cfg: RunConfig) -> PreflightResult:
    """Preflight only: data, model, LoRA, one real batch forward and backward; nothing is written."""
    from gemma4_tune.train.run import preflight

    return preflight(cfg)


def export(base: str | Path, adapter: str | Path, *, merged: str | Path | None = None,
           engines: tuple[str, ...] = ("transformers", "vllm", "llama.cpp"),
           shard_size_mb: int = 2000, vllm_adapter: str | Path | None = None, gguf: str | Path | None = None,
           gguf_type: str = "f32", log: Callable[[str], None] | None = None,
           merge_into: str | None = None) -> dict[str, Any]:
    """Check the adapter against each engine (refusing a foreign base); with ``merged``, write a
    streaming-merged checkpoint in the official key layout plus an Ollama Modelfile; with
    ``vllm_adapter``, a copy that vLLM serves like PEFT on K=V layers; with ``gguf`` (needs
    ``merged``), the merged model, its tower projector and the text LoRA as GGUF, converted by
    llama.cpp's own converters, and the Modelfile pointed at the GGUF. A QLoRA adapter is merged into the
    dequantized 4-bit weights it was trained with unless ``merge_into="original"`` (G4T814 then says so)."""
    from gemma4_tune.export.adapter import check_adapter_for_engines
    from gemma4_tune.export.merge import merge_adapter, merge_findings, merged_size

    for path, option in ((merged, "--merged"), (gguf, "--gguf"), (vllm_adapter, "--vllm-adapter")):
        if path is not None:
            check_writable(path, option, whole=True)
    if gguf is not None and merged is None:
        from gemma4_tune.verify.parity import MISSING_ARTEFACT

        raise FindingError(finding(MISSING_ARTEFACT.code, "--gguf converts the merged checkpoint, but no --merged "
                                   "was given", "add --merged DIR (the merged checkpoint is written there first)"))
    if gguf is not None:
        from gemma4_tune.engines.llamacpp_env import require_llamacpp
        from gemma4_tune.export.gguf import bounded_converter, check_memory, conversion_jobs, plan_gguf_export

        if Path(gguf).exists() and any(Path(gguf).iterdir()):
            raise FindingError(finding(OUTPUT_EXISTS.code, f"{gguf} already exists and is not empty",
                                       "choose a new --gguf directory, or remove the old one"))
        install = require_llamacpp()  # before the merge writes anything
        # the merge copies the base's towers: refuse a damaged one now (G4T912)
        gguf_plan = plan_gguf_export(base, adapter, base)
        # the merged checkpoint has the base's tensors: refuse now what the machine cannot convert (G4T919)
        check_memory(conversion_jobs(base, mmproj=gguf_plan["mmproj"]), gguf_type, bounded=bounded_converter(install))
    summary = check_adapter_for_engines(base, adapter, list(engines))
    report: dict[str, Any] = {"base": str(base), "adapter": str(adapter), "engines": list(engines),
                              "adapter_summary": summary.to_dict(), "findings": summary.findings}
    if merged is not None:  # the merge and the GGUF files, counted together when they share a disk
        from gemma4_tune.export.gguf import gguf_size

        needs = [(Path(merged), merged_size(base), "the merged checkpoint")]
        if gguf is not None:
            needs.append((Path(gguf), gguf_size(base, gguf_type, with_base=gguf_plan["convert_adapter"]),
                          "the GGUF files"))
        check_free_space(needs)
    if vllm_adapter is not None:
        from gemma4_tune.export.vllm_adapter import vllm_ready_adapter

        with output_errors(vllm_adapter, "the vLLM-ready adapter"):
            report["vllm_adapter"] = str(vllm_ready_adapter(adapter, base, vllm_adapter))
    if merged is not None:
        result = merge_adapter(base, adapter, merged, shard_size_mb=shard_size_mb, into=merge_into)
        report["merged"] = {"path": str(result.out_dir), "tensors_merged": result.tensors_merged,
                            "tensors_copied": result.tensors_copied, "bytes_written": result.bytes_written,
                            "shards": result.shards, "seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb,
                            "copied_by": result.copied_by, "weights": result.weights,
                            "tensors_dequantized": result.tensors_dequantized}
        report["findings"] += merge_findings(adapter, result)
    if gguf is not None:
        from gemma4_tune.export.gguf import export_gguf

        converted = export_gguf(merged, gguf, gguf_type, log=log, adapter_dir=adapter, base_dir=base)
        report["findings"] += converted.pop("findings")
        report["gguf"] = converted
    return report


def _write_verdict(out_dir: Path, report: dict[str, Any], lines: list[str]) -> None:
    """``verify.json`` and ``verify.md`` in ``out_dir``, each written whole."""
    with output_errors(out_dir, "verify.json and verify.md"):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "verify.json", report)
        write_text_atomic(out_dir / "verify.md", "\n".join(lines) + "\n")


def verify(base: str | Path, adapter: str | Path, *, merged: str | Path | None = None,
           engines: tuple[str, ...] = ("peft", "transformers"), out: str | Path | None = None,
           gguf: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load each artefact as its engine does and compare it with base + adapter in PEFT; ``llama.cpp``
    runs the GGUF files of ``gguf`` (an ``export --gguf`` directory) in a real llama.cpp.

    Writes ``verify.json`` and ``verify.md`` into ``out`` (default: the adapter's parent folder).
    """
    from gemma4_tune.export.manifest import check_adapter_matches_base, check_served_template
    from gemma4_tune.verify.parity import MISSING_ARTEFACT, check_engines, verify_artefacts
    from gemma4_tune.verify.reference import trained_quantization
    from gemma4_tune.verify.verdict import explain_four_bit, report_findings, require_comparisons

    check_engines(engines)
    base, adapter = Path(base), Path(adapter)
    out_dir = Path(out) if out else adapter.parent
    check_writable(out_dir, "--out")  # before any model is loaded (G4T021)
    header = {"base": str(base), "adapter": str(adapter), "merged": str(merged) if merged else None,
              "gguf": str(gguf) if gguf else None}
    try:
        notes = check_adapter_matches_base(adapter, base)
        notes += check_served_template(adapter, [base, merged])  # G4T812 warns, G4T813 stops (catalog row 34)
        if "llama.cpp" in engines and gguf is None:
            raise FindingError(finding(MISSING_ARTEFACT.code, "--engine llama.cpp checks the GGUF export, but no "
                                       "--gguf was given", "pass --gguf DIR (make one with `gemma4-tune export "
                                       "--merged M --gguf DIR`) or drop llama.cpp from --engine"))
        quant = trained_quantization(adapter)
        others = [e for e in engines if e != "llama.cpp"]
        results = verify_artefacts(base, adapter, Path(merged) if merged else None, others) if others else []
        if "llama.cpp" in engines:
            from gemma4_tune.verify.llamacpp import engine_results

            results += engine_results(base, adapter, Path(gguf).resolve(), log=log)  # llama.cpp runs elsewhere
    except FindingError as exc:  # refused before anything was compared: the verdict says so too
        _write_verdict(out_dir, {**header, "engines": [], "ok": False, "refused": True,
                                 "findings": [f.to_dict() for f in exc.findings]},
                       ["# gemma4-tune verify", "", "Refused before any engine was compared:", "",
                        *[f"- **{f.code}**: {f.message} — {f.fix}" for f in exc.findings]])
        raise
    require_comparisons(results)
    explain_four_bit(results, quant)  # QLoRA: a row off the 4-bit model says so (G4T619, row 38)
    report = {**header, "quantization": quant.to_dict() if quant else None,
              "engines": [r.to_dict() for r in results], "ok": all(r.ok for r in results)}
    trained = f"the base in {quant.describe()} + adapter in transformers + PEFT, as trained" if quant else \
        "base + adapter in transformers + PEFT (fp32)"
    lines = ["# gemma4-tune verify", "",
             f"base `{base}`, adapter `{adapter}`, merged `{merged or '-'}`, GGUF `{gguf or '-'}`", "",
             f"One row per engine and modality: what it ran, against {trained}.", "",
             "| engine | modality | compared | max logit diff | tolerance | greedy agreement | adapter effect | "
             "verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r.engine} | {', '.join(r.modalities) or '-'} | {r.prompts} prompts, {r.positions} positions | "
              f"{r.max_logit_diff:.2e} | {r.rule} | {r.greedy_agreement:.1%} | {r.adapter_effect:.2e} | {r.verdict} |"
              for r in results]
    findings = [*notes, *report_findings(results)]
    if findings:
        lines += ["", "## Findings", ""] + [f"- **{f.code}**: {f.message} — {f.fix}" for f in findings]
    _write_verdict(out_dir, report, lines)
    report["findings"] = findings
    report["paths"] = {"json": str(out_dir / "verify.json"), "markdown": str(out_dir / "verify.md")}
    return report
