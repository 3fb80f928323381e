"""The ``gemma4-tune`` command line: parse, call the API, render findings.

Exit codes: 0 ok, 1 a check failed (findings with errors), 2 usage error.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from gemma4_tune import __version__
from gemma4_tune.console import err_console, print_json, render_findings, render_profile
from gemma4_tune.findings import FindingError

app = typer.Typer(
    name="gemma4-tune",
    help="Fine-tune Gemma 4 with LoRA correctly the first time, and prove every export behaves like the trained model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemma4-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _fail(exc: FindingError) -> NoReturn:
    render_findings(exc.findings, stderr=True)
    if _state["debug"]:
        err_console.print(traceback.format_exc(), markup=False)
    raise typer.Exit(1)


@app.command("tiny-model")
def tiny_model(
    variant: Annotated[str, typer.Option("--variant", help="e2b, e4b, 26b-a4b or 31b")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist or be empty)")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed for the weights")] = 0,
    template_revision: Annotated[str, typer.Option("--template-revision",
                                                   help="Official chat template revision to ship (v1..v5)")] = "v5",
) -> None:
    """Write a tiny random-weight Gemma 4 with the variant's structure (a few MB)."""
    from gemma4_tune.api import tiny_model as build

    try:
        path = build(variant, out, seed=seed, template_revision=template_revision)
    except FindingError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model directory or catalog id (e2b, e4b, 26b-a4b, 31b)")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show what a Gemma 4 checkpoint is: towers, per-layer facts, MoE, PLE, parameter counts."""
    from gemma4_tune.profile import ModelProfile

    try:
        profile = ModelProfile.from_pretrained(model)
    except FindingError as exc:
        _fail(exc)
    if json_out:
        print_json(profile.to_dict())
    else:
        render_profile(profile)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except Exception:
        if _state["debug"]:
            raise
        err_console.print("[bold red]internal error[/] (run again with --debug for the traceback):")
        err_console.print(traceback.format_exc().strip().splitlines()[-1], markup=False)
        raise SystemExit(1) from None
