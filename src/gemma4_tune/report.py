"""Run reports: ``report.json`` for machines, ``report.md`` and a loss-curve PNG for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma4_tune.findings import Finding


def loss_plot(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss against step, as a PNG; None when nothing was logged."""
    points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path, sections: dict[str, Any], findings: list[Finding]) -> dict[str, Path]:
    """Write report.json, report.md and loss.png into ``out``; return their paths."""
    metrics = sections.get("metrics", [])
    plot = loss_plot(metrics, out / "loss.png")
    data = {**sections, "findings": [f.to_dict() for f in findings]}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(sections, findings, plot))
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    if plot:
        paths["plot"] = plot
    return paths


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _markdown(sections: dict[str, Any], findings: list[Finding], plot: Path | None) -> str:
    cfg = sections.get("config", {})
    data = sections.get("data", {})
    plan = sections.get("plan", {})
    summary = sections.get("summary", {})
    parts = [f"# gemma4-tune run: {cfg.get('out', '')}\n"]
    if summary:
        parts.append("## Result\n\n" + _table(list(summary.items())))
    parts.append("## Settings\n\n" + _table([(k, v) for k, v in cfg.items()]))
    parts.append("## Data\n\n" + _table([
        ("conversations", data.get("kept")), ("rows dropped", data.get("dropped") or 0),
        ("modalities", data.get("modalities")), ("tokens", data.get("tokens")),
        ("supervised tokens", data.get("supervised_tokens")), ("truncated examples", data.get("truncated")),
        ("chat template revision", data.get("template_revision")), ("packing", data.get("packing")),
    ]))
    parts.append("## LoRA targets\n\n" + _table([
        ("spec", plan.get("spec")), ("trainable parameters", plan.get("trainable")),
        ("skipped projections", plan.get("skipped")),
    ]))
    if plot:
        parts.append(f"## Loss\n\n![loss curve]({plot.name})\n")
    metrics = sections.get("metrics", [])
    if metrics:
        rows = ["| step | loss | lr | grad norm | tokens/s |", "|---:|---:|---:|---:|---:|"]
        rows += [f"| {m['step']} | {m['loss']:.4f} | {m.get('learning_rate', 0):.2e} | "
                 f"{m.get('grad_norm', float('nan')):.3f} | {m.get('tokens_per_s', 0):.0f} |" for m in metrics]
        parts.append("## Steps\n\n" + "\n".join(rows) + "\n")
    for title, table in sections.get("extra_tables", {}).items():
        parts.append(f"## {title}\n\n{table}\n")
    if findings:
        parts.append("## Findings\n\n" + "\n".join(f"- **{f.code}** ({f.severity.value}): {f.message} — {f.fix}"
                                                 for f in findings) + "\n")
    versions = sections.get("versions", {})
    if versions:
        parts.append("## Versions\n\n" + _table(list(versions.items())))
    return "\n".join(parts)
