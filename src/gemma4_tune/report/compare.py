"""``compare``: several runs' metrics in one table and one plot (loss and held-out loss against step and tokens)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma4_tune.findings import FindingError, Severity, finding, register
from gemma4_tune.io import atomic_file, write_json, write_text_atomic

NOT_A_RUN = register("G4T409", Severity.ERROR, "Not a training run directory")


@dataclass
class RunSummary:
    """The figures of one run that a comparison shows."""

    name: str
    path: str
    method: str                # sft, dpo, kto or grpo: their losses are different quantities
    steps: int
    tokens: int
    final_loss: float          # mean of the last 3 logged losses
    eval_loss_start: float | None
    eval_loss_end: float | None
    eval_accuracy_start: float | None
    eval_accuracy_end: float | None
    eval_reward_accuracy_start: float | None  # dpo: held-out pairs whose chosen answer the model prefers
    eval_reward_accuracy_end: float | None
    eval_reward_margin_start: float | None  # dpo, kto: held-out reward of the chosen minus the rejected answers
    eval_reward_margin_end: float | None
    eval_reward_start: float | None  # grpo: held-out reward of greedy answers, base (start) and tuned (end)
    eval_reward_end: float | None
    tokens_per_s: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` of a run directory; G4T409 when there is none."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FindingError(finding(NOT_A_RUN.code, f"{run} has no metrics.jsonl",
                                   "pass the --out directory of a `gemma4-tune train` run"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _name(run: Path, taken: set[str]) -> str:
    name = run.name if run.name not in taken else f"{run.parent.name}/{run.name}"
    taken.add(name)
    return name


def summarize(run: Path, name: str) -> tuple[RunSummary, list[dict[str, Any]]]:
    """One run's summary and its metric rows."""
    metrics = read_metrics(run)
    losses = [m for m in metrics if m.get("loss") is not None and math.isfinite(m["loss"])]
    evals = [m for m in metrics if "eval_loss" in m]
    rewards = [m for m in metrics if "eval_reward_margin" in m]
    accuracies = [m for m in rewards if "eval_reward_accuracy" in m]  # DPO's; KTO has no pairs to count
    scored = [m for m in metrics if "eval_reward" in m]  # GRPO's: the base's row, then the tuned model's
    config: dict[str, Any] = {}
    if (run / "run.json").is_file():
        config = json.loads((run / "run.json").read_text()).get("config", {})
    keys = ("model", "targets", "rank", "lr", "batch_size", "grad_accum", "max_seq_len", "packing", "beta")
    tail = losses[-3:]
    return RunSummary(
        name=name, path=str(run), method=config.get("method", "sft"), steps=losses[-1]["step"] if losses else 0,
        tokens=losses[-1].get("tokens", 0) if losses else 0,
        final_loss=sum(m["loss"] for m in tail) / len(tail) if tail else float("nan"),
        eval_loss_start=evals[0]["eval_loss"] if evals else None, eval_loss_end=evals[-1]["eval_loss"] if evals else None,
        eval_accuracy_start=evals[0]["eval_accuracy"] if evals else None,
        eval_accuracy_end=evals[-1]["eval_accuracy"] if evals else None,
        eval_reward_accuracy_start=accuracies[0]["eval_reward_accuracy"] if accuracies else None,
        eval_reward_accuracy_end=accuracies[-1]["eval_reward_accuracy"] if accuracies else None,
        eval_reward_margin_start=rewards[0]["eval_reward_margin"] if rewards else None,
        eval_reward_margin_end=rewards[-1]["eval_reward_margin"] if rewards else None,
        eval_reward_start=scored[0]["eval_reward"] if scored else None,
        eval_reward_end=scored[-1]["eval_reward"] if scored else None,
        tokens_per_s=losses[-1].get("tokens_per_s", 0.0) if losses else 0.0,
        settings={k: config[k] for k in keys if k in config and (k != "beta" or config.get("method") in ("dpo", "kto", "grpo"))}), metrics


def compare_plot(runs: list[tuple[RunSummary, list[dict[str, Any]]]], path: Path) -> Path:
    """Loss (solid) and held-out loss (dashed, squares) of every run, against step and against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (summary, metrics) in enumerate(runs):
        colour = colours[i % len(colours)]
        train = [m for m in metrics if "loss" in m]
        evals = [m for m in metrics if "eval_loss" in m]
        for ax, x in ((axes[0], "step"), (axes[1], "tokens")):
            ax.plot([m[x] for m in train], [m["loss"] for m in train], color=colour, linewidth=1.2,
                    label=f"{summary.name} train")
            if evals:
                ax.plot([m[x] for m in evals], [m["eval_loss"] for m in evals], color=colour, linestyle="--",
                        marker="s", markersize=4, label=f"{summary.name} held-out")
    for ax, x in ((axes[0], "step"), (axes[1], "training tokens")):
        ax.set_xlabel(x)
        ax.set_ylabel("loss (per supervised token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def compare_runs(runs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Compare run directories: writes ``compare.json``, ``compare.md`` and ``compare.png`` into ``out``."""
    if len(runs) < 2:
        raise FindingError(finding(NOT_A_RUN.code, "compare needs at least two run directories",
                                   "gemma4-tune compare runs/a runs/b"))
    taken: set[str] = set()
    summaries = [summarize(Path(r), _name(Path(r), taken)) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot = compare_plot(summaries, out / "compare.png")
    rows = [s for s, _ in summaries]
    lines = ["# gemma4-tune compare", "",
             "| run | method | steps | tokens | final loss | held-out loss (start -> end) | held-out accuracy "
             "(start -> end) | held-out reward accuracy (start -> end) | held-out reward margin (start -> end) | held-out "
             "reward, greedy (base -> tuned) | tokens/s | settings |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in rows:
        settings = ", ".join(f"{k}={v}" for k, v in s.settings.items() if k != "model")
        lines.append(f"| {s.name} | {s.method} | {s.steps} | {s.tokens} | {s.final_loss:.4f} | "
                     f"{_opt(s.eval_loss_start, '.4f')} -> {_opt(s.eval_loss_end, '.4f')} | "
                     f"{_opt(s.eval_accuracy_start, '.1%')} -> {_opt(s.eval_accuracy_end, '.1%')} | "
                     f"{_opt(s.eval_reward_accuracy_start, '.1%')} -> {_opt(s.eval_reward_accuracy_end, '.1%')} | "
                     f"{_opt(s.eval_reward_margin_start, '.3f')} -> {_opt(s.eval_reward_margin_end, '.3f')} | "
                     f"{_opt(s.eval_reward_start, '.3f')} -> {_opt(s.eval_reward_end, '.3f')} | "
                     f"{s.tokens_per_s:.0f} | {settings} |")
    lines += ["", "An SFT loss is a cross-entropy per token; a DPO loss is -log sigmoid of the reward margin per pair; a KTO "
              "loss is 1 - sigmoid of each answer's reward against a KL estimate; a GRPO loss is a policy-gradient surrogate "
              "(about 0 whatever the rewards): compare losses only between runs of one method.", "", f"![loss curves]({plot.name})", ""]
    write_text_atomic(out / "compare.md", "\n".join(lines))
    report = {"runs": [s.to_dict() for s in rows], "plot": str(plot), "markdown": str(out / "compare.md")}
    write_json(out / "compare.json", report)
    return report
