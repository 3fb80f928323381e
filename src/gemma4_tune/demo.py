"""``gemma4-tune demo``: the whole pipeline on a tiny Gemma 4 built locally, offline on a CPU.

Build a tiny E2B-shaped model (random weights, real structure), generate a small
text + image + audio chat dataset, plan LoRA on the text, vision and audio towers,
train, prove the saved adapter reproduces the trained model and changes its output,
export a merged checkpoint and verify every artefact in its engine (stock PEFT, stock
transformers, and a real vLLM when its environment is installed), and write the report.
``summary.json`` keeps the figures.

The demo writes a marker file (``.gemma4-tune-demo``) into a new or empty ``--out``. Run again
into the same folder, it reuses the model and data and replaces only its own earlier ``run`` and
``merged`` folders; anything it did not write is never deleted (G4T004, see :func:`demo_outputs`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from gemma4_tune.config.options import RunConfig
from gemma4_tune.console import console, render_findings
from gemma4_tune.findings import OUTPUT_EXISTS, FindingError, finding
from gemma4_tune.io import check_writable, write_json

DEMO_TARGETS = "text,vision,audio"
DEMO_STEPS = 80
DEMO_EVAL_SPLIT = 0.15
DEMO_MARKER = ".gemma4-tune-demo"
#: What `train`, its report and the demo's `verify` write into a run directory (a run killed before the demo
#: recorded what it wrote holds only these).
RUN_ENTRIES = frozenset({"adapter", "checkpoints", ".staging", "launch", "metrics.jsonl", "run-start.json",
                         "run.json", "preflight.json", "report.json", "report.md", "report.html", "loss.png",
                         "verify.json", "verify.md", "train.lock"})
REPLACED = ("run", "merged")


def _written_by_us(name: str, known: frozenset[str]) -> bool:
    """``name`` is one of ``known``, or the temporary or old copy an atomic write makes of one (``.x.tmp-*``,
    ``.x.old``)."""
    return name in known or re.sub(r"^\.(.+?)\.(tmp-.*|old)$", r"\1", name) in known


def _foreign(folder: Path, known: frozenset[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not _written_by_us(p.name, known))


def demo_outputs(out: Path) -> list[Path]:
    """The folders a demo into ``out`` will replace: its own earlier ``run`` and ``merged``, nothing else.

    Refuses (G4T004), before any work starts: a non-empty ``out`` without the demo's marker, and a
    ``run`` or ``merged`` folder holding anything the demo did not write. What it wrote is what its
    marker recorded at the end of the earlier demo, what a run writes (:data:`RUN_ENTRIES`) and what
    the merged checkpoint's record lists.
    """
    from gemma4_tune.export.merge import MERGE_RECORD

    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return []
    if not (out / DEMO_MARKER).is_file():
        raise FindingError(finding(OUTPUT_EXISTS.code, f"{out} is not empty and was not written by "
                                   "`gemma4-tune demo` (it has no .gemma4-tune-demo marker): nothing in it is "
                                   "replaced", "give --out a new or empty folder (or an earlier demo's folder)"))
    written = json.loads((out / DEMO_MARKER).read_text()).get("written", {})
    replaced = []
    for name in REPLACED:
        folder = out / name
        if not folder.exists():
            continue
        known = RUN_ENTRIES if name == "run" else frozenset()
        record = folder / MERGE_RECORD
        if name == "merged" and record.is_file():
            known = frozenset(json.loads(record.read_text()).get("files", []))
        known |= frozenset(written.get(name, []))
        foreign = _foreign(folder, known) if folder.is_dir() else [folder.name]
        if foreign:
            raise FindingError(finding(OUTPUT_EXISTS.code, f"{folder} holds what the demo did not write "
                                       f"({', '.join(foreign[:5])}): the demo would replace that folder",
                                       f"move those files out of {folder}, or give --out a new folder"))
        replaced.append(folder)
    return replaced


def _marker(written: dict[str, list[str]]) -> dict[str, Any]:
    return {"kind": "gemma4_tune.demo", "note": "written by `gemma4-tune demo`: a later demo here replaces only "
            "its own run/ and merged/ (the files listed under `written`)", "written": written}


def _record_written(out: Path) -> None:
    """Note in the marker what this demo wrote into the folders a later demo replaces."""
    write_json(out / DEMO_MARKER, _marker({name: sorted(p.name for p in (out / name).iterdir())
                                           for name in REPLACED if (out / name).is_dir()}))


def run_demo(out: Path, *, seed: int = 0, steps: int = DEMO_STEPS) -> dict[str, Any]:
    """Run the demo into ``out`` (re-runnable: the model and data are reused, the run is redone)."""
    import shutil

    from gemma4_tune.api import export, plan, run_training, tiny_model, verify
    from gemma4_tune.data.demo_data import write_demo_dataset
    from gemma4_tune.engines.vllm_env import vllm_python
    from gemma4_tune.report.run_report import write_report
    from gemma4_tune.train.base import loss_went_down

    out = Path(out)
    check_writable(out, "--out")
    replaced = demo_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / DEMO_MARKER).is_file():
        write_json(out / DEMO_MARKER, _marker({}))
    started = time.perf_counter()

    console.rule("[bold]1. A tiny Gemma 4 E2B (random weights, the real structure)")
    model_dir = out / "tiny-e2b"
    if not (model_dir / "config.json").is_file():
        tiny_model("e2b", model_dir, seed=seed)
    profile, target_plan, _ = plan(model_dir, DEMO_TARGETS, rank=8)
    shared = sum(1 for layer in profile.layers if layer.kv_sharing == "reuse")
    console.print(f"{model_dir}: {profile.parameters['total']:,} parameters; {profile.num_layers} text layers "
                  f"({shared} KV-shared), per-layer embeddings, towers: "
                  f"{', '.join(t.name for t in profile.towers)} (clipped linears)")

    console.rule("[bold]2. A generated chat dataset: text, image and audio turns")
    data = out / "data" / "train.jsonl"
    if not data.is_file():
        write_demo_dataset(data.parent, seed=seed)
    console.print(f"{data}: {sum(1 for _ in data.open())} conversations")

    console.rule(f"[bold]3. LoRA plan '{DEMO_TARGETS}'")
    per_group = target_plan.trainable_by_group()
    for group in target_plan.groups:
        n = sum(1 for t in target_plan.targets if t.group == group)
        console.print(f"  {group:6s} {n:3d} modules  {per_group[group]:>8,} parameters")
    console.print(f"  skipped: {len(target_plan.skipped)} projections that KV-shared layers do not have")

    console.rule(f"[bold]4. Train {steps} steps")
    run_dir = out / "run"
    if run_dir in replaced:
        shutil.rmtree(run_dir)
    cfg = RunConfig(model=str(model_dir), data=str(data), out=str(run_dir), targets=DEMO_TARGETS, rank=8,
                    max_steps=steps, batch_size=4, lr=1e-2, save_steps=max(steps // 2, 1), seed=seed,
                    eval_split=DEMO_EVAL_SPLIT, eval_steps=max(steps // 4, 1), samples=3)
    result = run_training(cfg)
    evals = [m for m in result.metrics if "eval_loss" in m]
    console.print(f"  held-out loss {evals[0]['eval_loss']:.3f} (base model) -> {evals[-1]['eval_loss']:.3f} (tuned); "
                  f"token accuracy {evals[0]['eval_accuracy']:.1%} -> {evals[-1]['eval_accuracy']:.1%}")

    console.rule("[bold]5. Verify the saved adapter")
    parity = result.parity
    console.print(f"  max |logit difference| saved adapter vs trained model: {parity.max_logit_diff:.2e} "
                  f"(tolerance {parity.tolerance:.0e})")
    console.print(f"  greedy-token agreement: {parity.greedy_agreement:.1%}")
    console.print(f"  max |logit change| made by the adapter: {parity.adapter_effect:.2e}")
    render_findings(result.findings)

    console.rule("[bold]6. Export a merged checkpoint and verify every artefact in its engine")
    merged = out / "merged"
    if merged in replaced:
        shutil.rmtree(merged)
    exported = export(model_dir, result.adapter, merged=merged)
    console.print(f"  merged checkpoint {merged}: {exported['merged']['tensors_merged']} tensors merged, "
                  f"{exported['merged']['tensors_copied']} copied, {exported['merged']['seconds']:.1f} s; "
                  f"Ollama Modelfile beside it")
    engines = ("peft", "transformers") + (("vllm",) if vllm_python() is not None else ())
    if "vllm" not in engines:
        console.print("  [dim]vLLM not installed (`gemma4-tune engines install vllm`): checking transformers "
                      "and PEFT only[/]")
    verified = verify(model_dir, result.adapter, merged=merged, engines=engines, out=run_dir)
    for r in verified["engines"]:
        what = f"{r['engine']} · {', '.join(r['modalities'])}"
        if r["not_run"]:
            console.print(f"  {what:38s} not run: {r['not_run'][:120]}")
            continue
        console.print(f"  {what:38s} max |diff| {r['max_logit_diff']:.2e} (tolerance {r['tolerance']:.0e}), "
                      f"greedy agreement {r['greedy_agreement']:.1%}, adapter effect {r['adapter_effect']:.2e}: "
                      f"{r['verdict']}")
    report = {**result.report, "verification": {
        **result.report["verification"], "engines": verified["engines"],
        "export": {"merged checkpoint": str(merged), "tensors merged": exported["merged"]["tensors_merged"],
                   "tensors copied": exported["merged"]["tensors_copied"],
                   "merge seconds": exported["merged"]["seconds"], "Ollama Modelfile": str(merged / "Modelfile")}}}
    write_report(run_dir, report, result.findings)
    _record_written(out)
    if not verified["ok"]:
        raise FindingError(*verified["findings"])

    first, last = loss_went_down(result.metrics, window=10)
    summary = {
        "model": str(model_dir), "data": str(data), "run": str(run_dir), "steps": steps,
        "loss_first_10_steps": round(first, 4), "loss_last_10_steps": round(last, 4),
        "report": str(run_dir / "report.html"), "adapter": str(result.adapter),
        "verification": parity.to_dict(), "engines": verified["engines"],
        "eval_loss_base": evals[0]["eval_loss"], "eval_loss_tuned": evals[-1]["eval_loss"],
        "eval_accuracy_base": evals[0]["eval_accuracy"], "eval_accuracy_tuned": evals[-1]["eval_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "summary.json", summary)
    console.rule("[bold green]demo finished")
    console.print(f"mean loss of the first 10 steps {first:.3f} -> last 10 steps {last:.3f}; "
                  f"{summary['seconds']} s in all")
    console.print(f"report: {run_dir / 'report.html'} ({run_dir / 'report.md'}, curves {run_dir / 'loss.png'})")
    return summary
