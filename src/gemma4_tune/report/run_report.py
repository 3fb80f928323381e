"""Run reports: ``report.json`` for machines, ``report.md`` and a self-contained ``report.html`` for people.

Both human formats are rendered from one list of sections, so they always say the same
thing: result, eval before/after, settings, data, targets, preflight, curves, samples,
export and verify results, timings and throughput, findings, versions. The curves are one
PNG (``loss.png``), linked from the markdown and embedded in the HTML.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.findings import Finding
from gemma4_tune.io import atomic_file, figure_text, write_json, write_text_atomic


@dataclass
class Block:
    """One piece of a section: ``kv`` (rows of label, value), ``table`` (header + rows), ``image``, ``pre``, ``text``."""

    kind: str
    rows: list[list[Any]] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    text: str = ""


Section = tuple[str, list[Block]]


def loss_plot(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Training and held-out loss against step (and held-out accuracy), as a PNG; None when nothing was logged."""
    train = [(m["step"], _value(m["loss"])) for m in metrics if "loss" in m]
    evals = [(m["step"], _value(m["eval_loss"]), m["eval_accuracy"]) for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 6, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([p[0] for p in train], [p[1] for p in train], marker="o", markersize=3, label="train loss")
    if evals:
        ax.plot([p[0] for p in evals], [p[1] for p in evals], marker="s", markersize=5, linestyle="--",
                label="held-out loss")
        acc = axes[0][1]
        acc.plot([p[0] for p in evals], [100 * p[2] for p in evals], marker="s", markersize=5, color="tab:green")
        acc.set_xlabel("step")
        acc.set_ylabel("held-out token accuracy (%)")
        acc.grid(alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _value(value: float | None) -> float:
    """A figure read back from strict JSON, where a NaN was written as null."""
    return float("nan") if value is None else float(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def _eval_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in metrics if "eval_loss" in m]


def _throughput(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [m for m in metrics if "loss" in m]
    if not steps:
        return {}
    return {"steps": steps[-1]["step"], "training tokens": steps[-1].get("tokens"),
            "tokens/s (whole run)": steps[-1].get("tokens_per_s")}


def build_sections(sections: dict[str, Any], findings: list[Finding], plot: Path | None) -> list[Section]:
    """The report's sections, in reading order, from the run's record."""
    cfg, data, plan = sections.get("config", {}), sections.get("data", {}), sections.get("plan", {})
    metrics = sections.get("metrics", [])
    out: list[Section] = []
    if sections.get("summary"):
        out.append(("Result", [Block("kv", [[k, v] for k, v in sections["summary"].items()])]))
    evals = _eval_rows(metrics)
    if evals:
        first, last = evals[0], evals[-1]
        out.append(("Held-out evaluation", [
            Block("text", text=f"{last['eval_tokens']} supervised tokens of {data.get('eval_conversations')} "
                               f"held-out conversations ({data.get('eval_source')}); loss computed exactly like "
                               "the training loss. Step 0 is the base model."),
            Block("table", header=["", f"step {first['step']} (base)", f"step {last['step']} (tuned)", "change"],
                  rows=[["loss", figure_text(first["eval_loss"], ".4f"), figure_text(last["eval_loss"], ".4f"),
                         figure_text(_value(last["eval_loss"]) - _value(first["eval_loss"]), "+.4f")],
                        ["token accuracy", f"{first['eval_accuracy']:.1%}", f"{last['eval_accuracy']:.1%}",
                         f"{100 * (last['eval_accuracy'] - first['eval_accuracy']):+.1f} pt"]]),
            Block("table", header=["step", "held-out loss", "token accuracy", "training tokens seen"],
                  rows=[[m["step"], figure_text(m["eval_loss"], ".4f"), f"{m['eval_accuracy']:.1%}", m.get("tokens")]
                        for m in evals]),
        ]))
    for method in ("dpo", "kto"):
        out += _preference_section(method, sections.get(method) or {})
    out += _grpo_section(sections.get("grpo") or {})
    if plot:
        out.append(("Curves", [Block("image", text=plot.name)]))
    samples = sections.get("samples") or []
    if samples:
        where = "held-out" if samples[0].get("held_out") else "training (no held-out data was given)"
        out.append(("Samples", [
            Block("text", text=f"Greedy answers to {len(samples)} {where} prompts, by the base model and the "
                               "tuned model, with the reference answer. \"stops\": the tuned answer ended with "
                               f"<turn|> within the token budget ({sum(bool(s.get('tuned_stopped')) for s in samples)}"
                               f" of {len(samples)})."),
            Block("table", header=["kind", "prompt", "reference", "base model", "tuned model", "stops"],
                  rows=[[s["kind"], s["prompt"], s["reference"], s["base"], s["tuned"],
                         "yes" if s.get("tuned_stopped") else "no"] for s in samples]),
        ]))
    verification = sections.get("verification") or {}
    blocks = []
    reload = verification.get("peft_reload")
    if reload:
        blocks.append(Block("table", header=["check (saved adapter in stock PEFT)", "figure"], rows=[
            ["max logit difference, saved adapter vs trained model", f"{reload['max_logit_diff']:.2e}"],
            ["greedy-token agreement", f"{reload['greedy_agreement']:.1%}"],
            ["max logit change made by the adapter", f"{reload['adapter_effect']:.2e}"],
            ["verdict", "pass" if reload["ok"] else "FAIL"]]))
    tensors = verification.get("saved_tensors")
    if tensors:
        blocks.append(Block("table", header=["check (saved adapter vs the trained LoRA weights, tensor by tensor)", "figure"],
                            rows=[["tensors saved", str(tensors["tensors"])],
                                  ["max tensor difference", f"{tensors['max_tensor_diff']:.2e}"],
                                  ["trained tensors missing", str(len(tensors["missing"]))],
                                  ["max |lora_B|", f"{tensors['max_abs_lora_b']:.2e}"],
                                  ["verdict", "pass" if tensors["ok"] else "FAIL"]]))
    if verification.get("export"):
        blocks.append(Block("kv", [[k, v] for k, v in verification["export"].items()]))
    if verification.get("engines"):
        blocks.append(Block("table", header=["engine", "modality", "compared", "max diff", "tolerance",
                                             "greedy agreement", "adapter effect", "verdict"],
                            rows=[[r["engine"], ", ".join(r.get("modalities") or []) or "-",
                                   f"{r.get('prompts', 0)} prompts, {r.get('positions', 0)} positions",
                                   f"{r['max_logit_diff']:.2e}", r.get("rule") or f"{r['tolerance']:.0e}",
                                   f"{r['greedy_agreement']:.1%}", f"{r['adapter_effect']:.2e}",
                                   r.get("verdict") or ("pass" if r["ok"] else "FAIL")]
                                  for r in verification["engines"]]))
    if blocks:
        out.append(("Export and verification", blocks))
    out.append(("Settings", [Block("kv", [[k, v] for k, v in cfg.items()])]))
    out.append(("Data", [Block("kv", [
        ["conversations (training / held out)", f"{data.get('train_conversations', data.get('kept'))} / "
                                                f"{data.get('eval_conversations', 0)}"],
        ["rows dropped as invalid", sum((data.get("dropped") or {}).values())],
        ["modalities", data.get("modalities")], ["tokens", data.get("tokens")],
        ["supervised tokens", data.get("supervised_tokens")], ["supervised share", data.get("supervised_share")],
        ["truncated examples", data.get("truncated")], ["chat template revision", data.get("template_revision")],
        ["packing", data.get("packing")]])]))
    out.append(("LoRA targets", [Block("kv", [["spec", plan.get("spec")],
                                              ["trainable parameters", plan.get("trainable")],
                                              ["skipped projections", plan.get("skipped")]])]))
    pf = sections.get("preflight")
    if pf:
        out.append(("Preflight", [
            Block("table", header=["check", "figure"], rows=[
                ["loss on a real batch", f"{pf['loss']:.4f}"],
                ["supervised / tokens in the batch", f"{pf['supervised_in_batch']} / {pf['tokens_in_batch']}"],
                *[[f"LoRA gradient reaching {t}", f"{g:.3e}"] for t, g in pf["lora_grad"].items()],
                ["seconds", pf["seconds"]]]),
            Block("text", text="Masked sample (supervised tokens in ⟦ ⟧):"),
            Block("pre", text=pf["sample"])]))
    steps = [m for m in metrics if "loss" in m]
    timing = {**(sections.get("timings") or {}), **_throughput(metrics)}
    if timing:
        out.append(("Timings and throughput", [Block("kv", [[k, v] for k, v in timing.items()])]))
    if steps:
        out.append(("Steps", [Block("table", header=["step", "loss", "lr", "grad norm", "tokens/s"], rows=[
            [m["step"], figure_text(m["loss"], ".4f"), figure_text(m.get("learning_rate", 0), ".2e"),
             figure_text(m.get("grad_norm"), ".3f"), figure_text(m.get("tokens_per_s", 0), ".0f")] for m in steps])]))
    if findings:
        out.append(("Findings", [Block("table", header=["code", "severity", "message", "fix"],
                                       rows=[[f.code, f.severity.value, f.message, f.fix] for f in findings])]))
    if sections.get("versions"):
        out.append(("Versions", [Block("kv", [[k, v] for k, v in sections["versions"].items()])]))
    return out


def _md_cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", "<br>")


def render_markdown(title: str, sections: list[Section]) -> str:
    """The sections as GitHub markdown."""
    parts = [f"# {title}\n"]
    for name, blocks in sections:
        parts.append(f"## {name}\n")
        for block in blocks:
            if block.kind == "kv":
                parts.append("| | |\n|---|---|\n" + "".join(f"| {_md_cell(k)} | {_md_cell(v)} |\n"
                                                           for k, v in block.rows))
            elif block.kind == "table":
                parts.append("| " + " | ".join(block.header) + " |\n|" + "---|" * len(block.header) + "\n"
                             + "".join("| " + " | ".join(_md_cell(c) for c in row) + " |\n" for row in block.rows))
            elif block.kind == "image":
                parts.append(f"![curves]({block.text})\n")
            elif block.kind == "pre":
                parts.append(f"```\n{block.text}\n```\n")
            else:
                parts.append(block.text + "\n")
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d2330;line-height:1.45}
h1{font-size:1.5em;border-bottom:2px solid #d0d7e2;padding-bottom:.3em}h2{font-size:1.15em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d0d7e2;padding:.3em .6em;text-align:left;vertical-align:top;max-width:28em;
overflow-wrap:anywhere}
th{background:#eef2f7}tr:nth-child(even) td{background:#f8fafc}
img{max-width:100%;border:1px solid #d0d7e2}pre{background:#f4f6f9;padding:.8em;overflow-x:auto;white-space:pre-wrap}
.FAIL{color:#b00020;font-weight:bold}.pass{color:#1b7f3b;font-weight:bold}
"""


def _html_cell(value: Any, tag: str = "td") -> str:
    text = _fmt(value)
    cls = f' class="{text}"' if text in ("pass", "FAIL") else ""
    return f"<{tag}{cls}>{html.escape(text)}</{tag}>"


def render_html(title: str, sections: list[Section], folder: Path) -> str:
    """The sections as one self-contained HTML page (images embedded as data URIs)."""
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for name, blocks in sections:
        slug = name.lower().replace(" ", "-")
        parts.append(f'<section id="{html.escape(slug)}"><h2>{html.escape(name)}</h2>')
        for block in blocks:
            if block.kind == "kv":
                parts.append("<table>" + "".join(f"<tr>{_html_cell(k, 'th')}{_html_cell(v)}</tr>"
                                                 for k, v in block.rows) + "</table>")
            elif block.kind == "table":
                parts.append("<table><thead><tr>" + "".join(_html_cell(h, "th") for h in block.header)
                             + "</tr></thead><tbody>" + "".join("<tr>" + "".join(_html_cell(c) for c in row)
                                                                 + "</tr>" for row in block.rows)
                             + "</tbody></table>")
            elif block.kind == "image":
                encoded = base64.b64encode((folder / block.text).read_bytes()).decode()
                parts.append(f'<img alt="loss and held-out curves" src="data:image/png;base64,{encoded}">')
            elif block.kind == "pre":
                parts.append(f"<pre>{html.escape(block.text)}</pre>")
            else:
                parts.append(f"<p>{html.escape(block.text)}</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out: Path, sections: dict[str, Any], findings: list[Finding]) -> dict[str, Path]:
    """Write report.json, report.md, report.html and loss.png into ``out``; return their paths."""
    plot = loss_plot(sections.get("metrics", []), out / "loss.png")
    data = {**sections, "findings": [f.to_dict() for f in findings]}
    write_json(out / "report.json", data)
    title = f"gemma4-tune run: {sections.get('config', {}).get('out', out)}"
    built = build_sections(sections, findings, plot)
    write_text_atomic(out / "report.md", render_markdown(title, built))
    write_text_atomic(out / "report.html", render_html(title, built, out))
    paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    if plot:
        paths["plot"] = plot
    return paths


def _preference_section(method: str, dpo: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    """``Preference tuning (DPO)`` or ``(KTO)``: the rows TRL trained at --max-seq-len, held-out rewards before and
    after, the reference checks, the plot."""
    if not (dpo.get("evals") or dpo.get("preflight") or dpo.get("rows")):
        return []
    blocks = []
    unit = dpo.get("unit_rows", "pairs")
    kept = [(side, rows) for side, rows in (("training", dpo.get("rows")), ("held-out", dpo.get("eval_rows"))) if rows]
    if kept:
        blocks.append(Block("table", header=[f"{unit} (failure catalog row 42)", "given", "trained",
                                             "cut to --max-seq-len", "no answer token left", "dropped by TRL",
                                             "longest (tokens)"],
                            rows=[[side, r["given"], r["trained"], r["truncated"], r["fully_truncated"],
                                   r["dropped_by_trl"], r["longest"]] for side, r in kept]))
    evals = dpo.get("evals") or []
    if len(evals) >= 2 and method == "kto":
        first, last = evals[0], evals[-1]
        blocks.append(Block("table", header=["held-out answers", f"step {first['step']} (base)",
                                             f"step {last['step']} (tuned)"],
                            rows=[["reward margin (chosen minus rejected)", figure_text(first["eval_reward_margin"], ".4f"),
                                   figure_text(last["eval_reward_margin"], ".4f")],
                                  ["reward of the chosen answers", figure_text(first["eval_reward_chosen"], ".4f"),
                                   figure_text(last["eval_reward_chosen"], ".4f")],
                                  ["reward of the rejected answers", figure_text(first["eval_reward_rejected"], ".4f"),
                                   figure_text(last["eval_reward_rejected"], ".4f")],
                                  ["KL estimate", figure_text(first["eval_kl"], ".4f"), figure_text(last["eval_kl"], ".4f")],
                                  ["KTO loss", figure_text(first["eval_kto_loss"], ".4f"), figure_text(last["eval_kto_loss"], ".4f")]]))
    if len(evals) >= 2 and method == "dpo":
        first, last = evals[0], evals[-1]
        blocks.append(Block("table", header=["held-out pairs", f"step {first['step']} (base)",
                                             f"step {last['step']} (tuned)"],
                            rows=[["reward accuracy (a tie counts as wrong)",
                                   f"{first['eval_reward_accuracy']:.1%}", f"{last['eval_reward_accuracy']:.1%}"],
                                  ["reward margin", figure_text(first["eval_reward_margin"], ".4f"),
                                   figure_text(last["eval_reward_margin"], ".4f")],
                                  ["DPO loss", figure_text(first["eval_dpo_loss"], ".4f"),
                                   figure_text(last["eval_dpo_loss"], ".4f")]]))
    pf = dpo.get("preflight") or {}
    if pf:
        blocks.append(Block("kv", [["step-0 log-ratio, policy vs reference", f"{pf['max_abs_log_ratio_step0']:.1e}"],
                                   ["reference = base (adapter disabled), lora_B noised",
                                    f"{pf['reference_equals_base']} (off by {pf['reference_minus_base']:.1e}; "
                                    f"policy moved {pf['policy_minus_base']:.2e})"]]))
    if dpo.get("plot"):
        blocks.append(Block("image", text=dpo["plot"]))
    return [(f"Preference tuning ({method.upper()})", blocks)]


def _grpo_section(grpo: dict[str, Any]) -> list[tuple[str, list[Block]]]:
    """``Reinforcement learning (GRPO)``: greedy rewards of the base and the tuned model, the first generation
    group's checks, the curves."""
    if not (grpo.get("evals") or grpo.get("preflight")):
        return []
    blocks = []
    evals = grpo.get("evals") or {}
    if evals:
        base, tuned = evals["base"], evals["tuned"]
        names = sorted(k for k in tuned if k.startswith("eval_rewards/"))
        rows = [["reward (weighted total)", figure_text(base["eval_reward"], ".4f"),
                 figure_text(tuned["eval_reward"], ".4f")]]
        rows += [[f"reward {k.split('/', 1)[1]}", figure_text(base.get(k), ".4f"), figure_text(tuned.get(k), ".4f")]
                 for k in names]
        rows += [["ended their turn", f"{base['eval_ended_turn']:.0%}", f"{tuned['eval_ended_turn']:.0%}"],
                 ["completion length (tokens)", f"{base['eval_completion_tokens']:.1f}",
                  f"{tuned['eval_completion_tokens']:.1f}"]]
        blocks.append(Block("table", header=[f"{evals['prompts']} {evals['where']} prompts, greedy", "base",
                                             f"tuned (step {tuned['step']})"], rows=rows))
    pf = grpo.get("preflight") or {}
    if pf:
        blocks.append(Block("kv", [
            ["first generation group", f"{pf['completions']} completions ({pf['group_size']} per prompt), reward "
                                       f"{pf['reward_mean']:.3f}, spread by group {pf['reward_spread_by_group']}"],
            ["pad tokens inside the prompt mask", str(pf["pad_tokens_inside_prompt_mask"])],
            ["forwards with images / with misaligned mm_token_type_ids",
             f"{pf['forwards_with_images']} / {pf['forwards_with_misaligned_mm_token_type_ids']}"],
            ["thinking switch per prompt", str(pf["thinking_switches_per_prompt"])],
            ["ended their turn", f"{pf['ended_turn_share']:.0%}"],
            ["reference = base (adapter disabled), lora_B noised",
             f"{pf['reference_equals_base']} (off by {pf['reference_minus_base']:.1e}; policy moved "
             f"{pf['policy_minus_base']:.2e})"]]))
    if grpo.get("plot"):
        blocks.append(Block("image", text=grpo["plot"]))
    return [("Reinforcement learning (GRPO)", blocks)]
