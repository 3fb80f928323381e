"""Terminal rendering shared by the commands: findings tables and profile reports."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from gemma4_tune.findings import Finding, Severity
from gemma4_tune.io import json_text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


_JSON_STREAM: list[TextIO] = []  # where print_json writes while json_only_stdout holds stdout


def print_json(data: Any) -> None:
    """Machine output: plain, strict JSON on stdout (NaN as null), nothing else."""
    (_JSON_STREAM[-1] if _JSON_STREAM else sys.stdout).write(json_text(data) + "\n")


@contextlib.contextmanager
def json_only_stdout() -> Iterator[None]:
    """Keep stdout for :func:`print_json` alone: everything else printed meanwhile goes to stderr.

    Libraries log to stdout (DeepSpeed's logger, imported with TRL, writes its accelerator warning there),
    which would make ``--json`` output unreadable; loggers created inside this context bind to stderr.
    """
    _JSON_STREAM.append(sys.stdout)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = _JSON_STREAM.pop()


def render_findings(findings: list[Finding], *, stderr: bool = False) -> None:
    """A table of findings: code, severity, what is wrong, how to fix it."""
    if not findings:
        return
    target = err_console if stderr else console
    if not target.is_terminal:
        for f in findings:
            target.print(f"{f.code} [{f.severity.value}]: {f.message} — {f.fix}", soft_wrap=True, markup=False)
        return
    table = Table(show_lines=True, title="Findings")
    table.add_column("code", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("what is wrong")
    table.add_column("fix")
    for f in findings:
        table.add_row(f.code, f"[{_STYLE[f.severity]}]{f.severity.value}[/]", f.message, f.fix)
    target.print(table)


def render_profile(profile: Any) -> None:
    """The human form of ``inspect``."""
    title = profile.variant or "unrecognised Gemma 4 shape"
    if profile.tiny:
        title += " (tiny random model)"
    console.print(f"[bold]{title}[/]  [dim]{profile.source}[/]")
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    moe = profile.moe
    rows = [
        ("architecture", profile.architecture),
        ("text layers", f"{profile.num_layers} (hidden {profile.hidden_size}, vocab {profile.vocab_size})"),
        ("attention", _attention_summary(profile)),
        ("sliding window", str(profile.sliding_window)),
        ("KV sharing", f"last {profile.num_kv_shared_layers} layers reuse K/V" if profile.num_kv_shared_layers
         else "none"),
        ("K=V global layers", "yes (no v_proj on full-attention layers)" if profile.attention_k_eq_v else "no"),
        ("double-wide MLP", "yes (KV-shared layers)" if profile.use_double_wide_mlp else "no"),
        ("per-layer embeddings", f"{profile.ple_hidden_size} per layer" if profile.ple_hidden_size else "no"),
        ("MoE", f"{moe['num_experts']} experts, top-{moe['top_k']}, expert width {moe['intermediate_size']}"
         if moe else "no"),
        ("bidirectional attention", profile.bidirectional_attention or "no (causal)"),
        ("tied embeddings", "yes" if profile.tied_embeddings else "no"),
        ("final logit softcap", str(profile.final_logit_softcapping)),
    ]
    for tower in profile.towers:
        rows.append((f"{tower.name} tower", f"{tower.num_layers} layers, hidden {tower.hidden_size}, "
                     f"{'clipped' if tower.clipped_linears else 'plain'} linears"))
    for embedder in profile.embedders:
        if profile.tower(embedder.name) is None:
            rows.append((f"{embedder.name} embedder", f"no tower: {embedder.input_size}-wide raw "
                         f"{'patches' if embedder.name == 'vision' else 'audio frames'} -> hidden "
                         f"{embedder.hidden_size} (target group {embedder.group})"))
    for k, v in rows:
        summary.add_row(k, v)
    console.print(summary)
    if profile.parameters:
        params = Table(title="Parameters")
        params.add_column("part")
        params.add_column("count", justify="right")
        for part, n in profile.parameters.items():
            params.add_row(part, f"{n:,}")
        console.print(params)
    layers = Table(title="Text layers")
    for col in ("#", "attention", "head_dim", "kv heads", "KV sharing", "projections", "MLP"):
        layers.add_column(col)
    for layer in profile.layers:
        mlp = "MLP + MoE" if layer.moe else ("double-wide MLP" if layer.double_wide_mlp else "MLP")
        layers.add_row(str(layer.index), layer.attention, str(layer.head_dim), str(layer.num_kv_heads),
                       layer.kv_sharing, ",".join(p.replace("_proj", "") for p in layer.attention_projections), mlp)
    console.print(layers)


def _attention_summary(profile: Any) -> str:
    sliding = sum(1 for layer in profile.layers if layer.attention == "sliding")
    full = len(profile.layers) - sliding
    dims = sorted({layer.head_dim for layer in profile.layers})
    return f"{sliding} sliding + {full} full; head_dim {'/'.join(map(str, dims))}"


def render_plan(profile: Any, plan: Any, memory: Any) -> None:
    """The human form of ``plan``: per tower and layer range, what gets LoRA and what was skipped."""
    console.print(f"[bold]Target plan[/] '{plan.spec}' (rank {plan.rank}) on "
                  f"{profile.variant or profile.source}{' (tiny)' if profile.tiny else ''}")
    rows: dict[tuple[str, int | None], tuple[list[str], list[str]]] = {}
    for t in plan.targets:
        name = t.path.split(f"layers.{t.layer}.", 1)[-1] if t.layer is not None else t.name
        name = name.removeprefix("self_attn.").removeprefix("mlp.").removesuffix(".linear")
        if t.kind == "experts":
            name += f" ({t.num_experts} experts)"
        rows.setdefault((t.group, t.layer), ([], []))[0].append(name)
    reasons: dict[int, dict[str, list[str]]] = {}
    for sk in plan.skipped:
        reasons.setdefault(sk.layer, {}).setdefault(sk.reason.split(":")[0], []).append(sk.name)
    table = Table(title="Per layer")
    for col in ("tower", "layers", "LoRA on", "skipped (why)"):
        table.add_column(col)
    merged: list[list[Any]] = []
    for (group, layer), (names, _) in rows.items():
        why = "; ".join(f"{', '.join(n)} ({r}, row 8)" for r, n in reasons.get(layer, {}).items()) \
            if group == "text" else ""
        key = (group, ", ".join(names), why)
        if merged and merged[-1][0] == key and layer is not None and merged[-1][2] == layer - 1:
            merged[-1][2] = layer
        else:
            merged.append([key, layer, layer])
    for (group, names, why), first, last in merged:
        span = "-" if first is None else (str(first) if first == last else f"{first}-{last}")
        table.add_row(group, span, names, why)
    console.print(table)
    if any(t.kind == "clippable" for t in plan.targets):
        console.print("[dim]Tower projections are Gemma4ClippableLinear: LoRA goes on their inner .linear, "
                      "so the clamps stay and keys keep the official layout.[/]")
    counts = Table(title="Trainable LoRA parameters")
    counts.add_column("tower")
    counts.add_column("modules", justify="right")
    counts.add_column("parameters", justify="right")
    per_group = plan.trainable_by_group()
    for group in plan.groups:
        n = sum(1 for t in plan.targets if t.group == group)
        counts.add_row(group, str(n), f"{per_group[group]:,}")
    counts.add_row("[bold]total[/]", str(len(plan.targets)), f"[bold]{per_group['total']:,}[/]")
    console.print(counts)
    console.print(f"Memory: {memory.summary()}")
    render_findings(plan.findings)


def render_preflight(result: Any) -> None:
    """The human form of ``preflight``."""
    console.print(f"[bold]Preflight[/] ({result.seconds:.1f} s): loss {result.loss:.4f} on a real batch; "
                  f"{result.supervised_in_batch} supervised of {result.tokens_in_batch} tokens")
    for tower, grad in result.lora_grad.items():
        console.print(f"  LoRA gradient reaching {tower:6s} |sum| = {grad:.3e}")
    if result.reference:
        console.print(f"  reference: step-0 log-ratio policy vs reference {result.reference['max_abs_log_ratio_step0']:.1e}; "
                      f"reference = base with the adapter disabled: "
                      f"{'yes' if result.reference['reference_equals_base'] else 'NO'}")
    if result.sample:
        console.print("Masked sample (supervised tokens in ⟦ ⟧):", style="bold")
        console.print(result.sample, markup=False, highlight=False)
    if result.findings:
        render_findings(result.findings)
    else:
        console.print("[green]no findings[/]")


def render_doctor(report: dict[str, Any]) -> None:
    """The human form of ``doctor``."""
    table = Table(title="Environment")
    table.add_column("component")
    table.add_column("version")
    for name, version in report["versions"].items():
        table.add_row(name, version or "[dim]not installed[/]")
    gpu = report["gpu"]
    table.add_row("GPU", f"{gpu['name']} ({gpu['total_gib']:.1f} GiB, bf16 {'yes' if gpu['bf16'] else 'no'})"
                  if gpu["cuda"] else "[dim]no CUDA device (CPU only: fp32, tiny models)[/]")
    console.print(table)
    memory = report.get("memory")
    if memory:
        mem = Table(title="Training memory estimate (GiB)")
        mem.add_column("part")
        mem.add_column("GiB", justify="right")
        for part in ("weights", "adapter", "gradients", "optimizer", "activations", "logits", "total"):
            mem.add_row(part, f"{memory[part]:.2f}")
        console.print(mem)
        for note in memory["notes"]:
            console.print(f"  {note}")
    if report["findings"]:
        render_findings(report["findings"])
    else:
        console.print("[green]no known-bad versions found[/]")


def render_mapping(imported: Any, *, json_out: bool = False) -> None:
    """``train --explain-config``: each key of a run file and what it became, then the resulting settings."""
    settings = imported.config.dump()
    if json_out:
        print_json({"dialect": imported.dialect, "mapping": imported.mapping, "config": settings,
                    "findings": [f.to_dict() for f in imported.findings]})
        return
    console.print(f"[bold]{imported.dialect} run file[/]: {len(imported.mapping) or len(settings)} keys")
    if imported.mapping and not console.is_terminal:
        for row in imported.mapping:
            console.print(f"  {row['key']} = {row['value']}  [{row['status']}] {row['became']}", markup=False,
                          soft_wrap=True)
    elif imported.mapping:
        table = Table(show_lines=False)
        for column in ("key", "value", "status", "became"):
            table.add_column(column, overflow="fold")
        for row in imported.mapping:
            table.add_row(row["key"], row["value"], row["status"], row["became"], style=None)
        console.print(table)
    console.print("[bold]settings[/]")
    for key, value in settings.items():
        console.print(f"  {key}: {value}", markup=False, soft_wrap=True)
    render_findings(imported.findings)
