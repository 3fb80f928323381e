"""Terminal rendering shared by the commands: findings tables and profile reports."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from gemma4_tune.findings import Finding, Severity

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def print_json(data: Any) -> None:
    """Machine output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


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
