"""The ``gemma4-tune`` command line: parse, call the API, render findings.

Exit codes: 0 ok, 1 a check failed (findings with errors), 2 usage error.
"""

from __future__ import annotations

import contextlib
import enum
import sys
import traceback
import types
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import typer
from rich.table import Table

from gemma4_tune import __version__
from gemma4_tune.config.options import RunConfig, cli_spec
from gemma4_tune.console import (
    console,
    err_console,
    json_only_stdout,
    print_json,
    render_doctor,
    render_findings,
    render_mapping,
    render_plan,
    render_preflight,
    render_profile,
)
from gemma4_tune.export.adapter import UNKNOWN_ENGINE
from gemma4_tune.findings import FindingError, Severity, finding, has_errors


class TinyDtype(str, enum.Enum):
    """Weight dtype of a tiny model."""

    float32 = "float32"
    bfloat16 = "bfloat16"


class GgufType(str, enum.Enum):
    """Tensor type of the GGUF files (q8_0 is quantised by llama.cpp's converter)."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class Quantize(str, enum.Enum):
    """Base-weight quantization for QLoRA."""

    four_bit = "4bit"


class MergeInto(str, enum.Enum):
    """What a QLoRA adapter is merged into: the dequantized 4-bit weights it trained with, or the originals."""

    dequantized = "dequantized"
    original = "original"

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


#: Commands that run models in this process: torch gets the cores that are idle when they start (threads.py).
_MODEL_COMMANDS = frozenset({"train", "preflight", "export", "verify", "compare", "serve", "repair", "demo"})


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug
    if ctx.invoked_subcommand in _MODEL_COMMANDS:
        from gemma4_tune.threads import use_idle_cores

        use_idle_cores()


def _fail(exc: FindingError) -> NoReturn:
    """Render the findings; exit 0 when none is an error (nothing to do, G4T415), 2 when the errors are all
    about the command's own settings (a usage error), else 1."""
    from gemma4_tune.config.options import BAD_CONFIG

    render_findings(exc.findings, stderr=True)
    if _state["debug"]:
        err_console.print(traceback.format_exc(), markup=False)
    if exc.findings and not has_errors(exc.findings):
        raise typer.Exit(0)
    usage = all(f.code == BAD_CONFIG.code for f in exc.findings if f.severity is Severity.ERROR)
    raise typer.Exit(2 if usage and exc.findings else 1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes its model, adapter and figures")] = Path(
        "runs/demo"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """The pipeline on a tiny Gemma 4 built locally: offline, on a laptop CPU."""
    from gemma4_tune.demo import run_demo

    try:
        run_demo(out, seed=seed)
    except FindingError as exc:
        _fail(exc)


@app.command("tiny-model")
def tiny_model(
    variant: Annotated[str, typer.Option("--variant", help="e2b, e4b, 26b-a4b, 31b or 12b")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist or be empty)")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed for the weights")] = 0,
    template_revision: Annotated[str, typer.Option("--template-revision",
                                                   help="Official chat template revision to ship (v1..v5)")] = "v5",
    dtype: Annotated[TinyDtype, typer.Option("--dtype", help="Weight dtype on disk (official checkpoints: "
                                             "bfloat16)")] = TinyDtype.float32,
) -> None:
    """Write a tiny random-weight Gemma 4 with the variant's structure (a few MB)."""
    from gemma4_tune.api import tiny_model as build

    try:
        path = build(variant, out, seed=seed, template_revision=template_revision, dtype=dtype.value)
    except FindingError as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model directory or catalog id (e2b, e4b, 26b-a4b, 31b, 12b)")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show what a Gemma 4 checkpoint is: towers, per-layer facts, MoE, PLE, parameter counts."""
    from gemma4_tune.model.profile import ModelProfile

    try:
        profile = ModelProfile.from_pretrained(model)
    except FindingError as exc:
        _fail(exc)
    if json_out:
        print_json(profile.to_dict())
    else:
        render_profile(profile)


@app.command()
def plan(
    model: Annotated[str, typer.Option("--model", help="Model directory or catalog id")],
    targets: Annotated[str, typer.Option("--targets", help="Comma list of text, text-attention, text-mlp, vision, "
                                         "audio, or re:<regex over module paths>")] = "text",
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank")] = 16,
    quantize: Annotated[Quantize | None, typer.Option("--quantize", help="Estimate QLoRA memory")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show which modules and expert parameters get LoRA, per tower and layer, and what each engine needs."""
    from gemma4_tune.api import plan as make_plan

    try:
        profile, target_plan, memory = make_plan(model, targets, rank=rank,
                                                 quantize=quantize.value if quantize else None)
    except FindingError as exc:
        _fail(exc)
    if json_out:
        print_json({"model": profile.source, "variant": profile.variant, **target_plan.to_dict(),
                    "memory": memory.to_dict()})
    else:
        render_plan(profile, target_plan, memory)
    if has_errors(target_plan.findings):
        raise typer.Exit(1)


def _alternatives(annotation: Any) -> list[Any]:
    """The types a field accepts, without None and Annotated's constraints (``Whole | None`` -> ``[int]``)."""
    if get_origin(annotation) is Annotated:
        return _alternatives(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [kind for arg in get_args(annotation) for kind in _alternatives(arg)]
    return [] if annotation is type(None) else [annotation]


def _flag_type(name: str, annotation: Any, choices: bool) -> Any:
    """A field's type on the command line: int, float, bool or str as declared, a Literal as str (RunConfig checks
    it) or, with ``choices``, as its values; anything else as one string (``data``: a path)."""
    kinds = _alternatives(annotation)
    if len(kinds) == 1 and get_origin(kinds[0]) is Literal:
        values = [str(value) for value in get_args(kinds[0])]
        return enum.Enum(f"{name}_choice", [(value, value) for value in values], type=str) if choices else str
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool, str) else str


def run_options(config: type[RunConfig] = RunConfig) -> list[Parameter]:
    """The flags of ``train`` and ``preflight``, one per field of ``config`` (``max_steps`` -> ``--max-steps``, help =
    the field's description), except the fields marked ``YAML_ONLY`` or ``OWN_FLAG``. Each defaults to None: only
    the flags given reach ``build_config``, where the run file and the defaults fill the rest."""
    params = []
    for name, info in config.model_fields.items():
        spec = cli_spec(info)
        if not isinstance(spec, dict):  # "yaml-only", or "own": declared by _train_command itself
            continue
        flag = spec["flag"] or "--" + name.replace("_", "-")
        kind = _flag_type(name, info.annotation, spec["choices"])
        params.append(Parameter(name, Parameter.KEYWORD_ONLY, default=None,
                                annotation=Annotated[kind | None, typer.Option(flag, help=info.description)]))
    return params


def _field_help(name: str) -> str | None:
    """The help of a flag that ``_train_command`` declares itself for a field (``OWN_FLAG``): its description."""
    return RunConfig.model_fields[name].description


def _train_command(preflight_only: bool, config: type[RunConfig] = RunConfig):  # noqa: ANN202 - a Typer command
    """`train` and `preflight` take the same arguments; build either command. Its options are ``run_options``
    (RunConfig's fields) between the run file and the flags below, which are no field or spell one otherwise."""

    def command(
        run_file: Annotated[Path | None, typer.Argument(help="YAML run file with the same keys as the flags")] = None,
        *,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="--distributed: write the launch files and "
                                              "print the command, start nothing")] = False,
        resume: Annotated[bool, typer.Option("--resume", help=_field_help("resume"))] = False,
        reward: Annotated[list[str] | None, typer.Option("--reward", help=_field_help("rewards"))] = None,
        reward_weights: Annotated[str | None, typer.Option("--reward-weights", help=_field_help("reward_weights"))
                                  ] = None,
        no_preflight: Annotated[bool, typer.Option("--no-preflight", help="Skip preflight (reported as G4T510)")
                                ] = False,
        json_out: Annotated[bool, typer.Option("--json", help="preflight: machine-readable output")] = False,
        explain_config: Annotated[bool, typer.Option("--explain-config", help="Show what each key of the run file "
                                                     "(ours or Axolotl's) became, then stop")] = False,
        **options: Any,
    ) -> None:
        from gemma4_tune.api import run_preflight, run_training
        from gemma4_tune.config.options import build_config
        from gemma4_tune.config.run_file import ImportedConfig, read_run_file

        flags = {name: value.value if isinstance(value, enum.Enum) else value for name, value in options.items()
                 if value is not None}
        if resume:
            flags["resume"] = True
        if reward:
            flags["rewards"] = list(reward)
        if reward_weights is not None:
            flags["reward_weights"] = reward_weights
        if no_preflight:
            flags["preflight"] = False
        from gemma4_tune.ranks import is_main_process, under_launcher
        from gemma4_tune.train.distributed import launch

        try:
            imported = read_run_file(run_file, flags) if run_file else ImportedConfig(build_config(flags))
            cfg = imported.config
            if explain_config:
                render_mapping(imported, json_out=json_out)
                return
            render_findings(imported.findings, stderr=True)
            if not preflight_only and cfg.out is None:
                raise typer.BadParameter("train needs --out (or output_dir / out in the run file)")
            if dry_run and (preflight_only or cfg.distributed is None):
                raise typer.BadParameter("--dry-run goes with `train --distributed`")
            if not preflight_only:
                from gemma4_tune.io import check_writable

                check_writable(cfg.out, "--out")  # before the launcher or the model (G4T021)
            if cfg.distributed and not preflight_only and not under_launcher():
                raise typer.Exit(launch(cfg, dry_run=dry_run, log=typer.echo))
            if preflight_only:
                result = run_preflight(cfg)
            else:
                trained = run_training(cfg)
        except FindingError as exc:
            _fail(exc)
        if not preflight_only and not is_main_process():
            return
        if not preflight_only:
            render_findings([f for f in trained.findings if f.severity is not Severity.INFO])
            typer.echo(f"adapter: {trained.adapter}")
            typer.echo(f"report:  {trained.out / 'report.html'} ({trained.out / 'report.md'})")
            return
        if json_out:
            print_json(result.to_dict())
        else:
            render_preflight(result)
        if has_errors(result.findings):
            raise typer.Exit(1)

    own = signature(command, eval_str=True).parameters
    params = [own["run_file"], *run_options(config),
              *(param for name, param in own.items() if name != "run_file" and param.kind is not Parameter.VAR_KEYWORD)]
    command.__signature__ = Signature(params, return_annotation=None)  # what Typer reads
    command.__annotations__ = {param.name: param.annotation for param in params}
    return command


app.command("train", help="Fine-tune with LoRA (preflight first): writes adapter/, checkpoints/, metrics.jsonl, "
            "report.json, report.md and loss.png into --out.")(_train_command(preflight_only=False))
app.command("preflight", help="Load the model, apply LoRA, run one real batch forward and backward and check "
            "everything that would make training fail silently. Same arguments as train; writes nothing."
            )(_train_command(preflight_only=True))


@app.command()
def doctor(
    model: Annotated[str | None, typer.Option("--model", help="Directory or catalog id for a memory estimate")
                     ] = None,
    targets: Annotated[str, typer.Option("--targets", help="LoRA target spec")] = "text",
    rank: Annotated[int, typer.Option("--rank", min=1)] = 16,
    quantize: Annotated[Quantize | None, typer.Option("--quantize", help="Estimate QLoRA memory")] = None,
    seq_len: Annotated[int, typer.Option("--max-seq-len", min=1)] = 2048,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Check Python, torch, CUDA/bf16 and library versions against known Gemma 4 bugs; estimate memory."""
    from gemma4_tune.doctor import doctor as run_doctor

    try:
        report = run_doctor(model, targets=targets, rank=rank, quantize=quantize.value if quantize else None,
                            seq_len=seq_len, batch_size=batch_size) if model else run_doctor()
    except FindingError as exc:
        _fail(exc)
    if json_out:
        print_json({**report, "findings": [f.to_dict() for f in report["findings"]]})
    else:
        render_doctor(report)
    if has_errors(report["findings"]):
        raise typer.Exit(1)




def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@app.command()
def export(
    base: Annotated[str, typer.Option("--base", help="Base model directory the adapter was trained on")],
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter directory (PEFT format)")],
    merged: Annotated[Path | None, typer.Option("--merged", help="Write a merged checkpoint here (streaming)")
                      ] = None,
    engines: Annotated[str, typer.Option("--for", help="Engines to check the adapter for")
                       ] = "transformers,vllm,llama.cpp",
    shard_size_mb: Annotated[int, typer.Option("--shard-size-mb", min=1, help="Max size of a merged shard")] = 2000,
    vllm_adapter: Annotated[Path | None, typer.Option("--vllm-adapter", help="Also write a vLLM-ready copy of "
                                                      "the adapter (K=V layers, see G4T210)")] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="With --merged: also write GGUF files for llama.cpp "
                                              "and Ollama here (model, tower mmproj, text LoRA)")] = None,
    gguf_type: Annotated[GgufType, typer.Option("--gguf-type", help="GGUF tensor type")] = GgufType.f32,
    merge_into: Annotated[MergeInto | None, typer.Option(
        "--merge-into", help="QLoRA adapters: merge into the dequantized 4-bit weights it was trained with "
        "[default], or into the original weights (another model: G4T814)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Check an adapter against each serving engine; with --merged, write a merged checkpoint in the official
    key layout (plus an Ollama Modelfile), shard by shard; with --gguf, convert it with llama.cpp's converters."""
    from gemma4_tune.api import export as run_export

    try:
        report = run_export(base, adapter, merged=merged, engines=_split(engines), shard_size_mb=shard_size_mb,
                            vllm_adapter=vllm_adapter, gguf=gguf, gguf_type=gguf_type.value,
                            log=lambda line: err_console.print(line, markup=False),
                            merge_into=merge_into.value if merge_into else None)
    except FindingError as exc:
        _fail(exc)
    findings = report.pop("findings")
    if json_out:
        print_json({**report, "findings": [f.to_dict() for f in findings]})
    else:
        summary = report["adapter_summary"]
        console.print(f"adapter {adapter}: rank {summary['rank']}, towers {', '.join(summary['groups'])}, "
                      f"{summary['tensors']} tensors" + (", MoE experts" if summary["has_experts"] else ""))
        if "merged" in report:
            m = report["merged"]
            console.print(f"merged checkpoint {m['path']}: {m['tensors_merged']} tensors merged, "
                          f"{m['tensors_copied']} copied, {m['bytes_written'] / 1e6:.1f} MB in {len(m['shards'])} "
                          f"shard(s), {m['seconds']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB"
                          + (f"; merged into the dequantized 4-bit weights ({m['tensors_dequantized']} tensors), "
                             "the model you trained" if m["weights"] == "dequantized" else ""))
        if "gguf" in report:
            g = report["gguf"]
            for kind, path in g["files"].items():
                t = g["tensors"][kind]
                console.print(f"GGUF {kind}: {path} ({t['written']} tensors, {g['seconds'][kind]:.1f} s)")
            console.print(f"Ollama Modelfile: {g['modelfile']}" + (f" (and {g['repointed_modelfile']} now points "
                          "at the GGUF)" if g["repointed_modelfile"] else ""))
        render_findings(findings)
    if has_errors(findings):
        raise typer.Exit(1)


@app.command()
def verify(
    base: Annotated[str, typer.Option("--base", help="Base model directory")],
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter directory")],
    merged: Annotated[Path | None, typer.Option("--merged", help="Merged checkpoint to check")] = None,
    engines: Annotated[str, typer.Option("--engine", help="peft, transformers (the merged checkpoint), vllm, "
                                         "llama.cpp (the --gguf files)")] = "peft,transformers",
    gguf: Annotated[Path | None, typer.Option("--gguf", help="GGUF directory written by `export --gguf`")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where verify.json/verify.md go [adapter's parent]")
                   ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Load each artefact the way its engine does and compare it with base + adapter in PEFT; exit 0 only if
    every comparison passes and the adapter changes the output in every engine."""
    from gemma4_tune.api import verify as run_verify
    from gemma4_tune.verify.parity import ENGINES

    wanted = _split(engines)
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown or not wanted:
        raise typer.BadParameter(f"{'unknown engine ' + ', '.join(map(repr, unknown)) if unknown else 'no engine'}"
                                 f"; use a comma list of {', '.join(ENGINES)}", param_hint="--engine")
    if merged is None and "transformers" in wanted and engines == "peft,transformers":
        wanted = ("peft",)
    try:
        report = run_verify(base, adapter, merged=merged, engines=wanted, out=out, gguf=gguf,
                            log=lambda line: err_console.print(line, markup=False))
    except FindingError as exc:
        _fail(exc)
    findings = report.pop("findings")
    if json_out:
        print_json({**report, "findings": [f.to_dict() for f in findings]})
    else:
        trained = "the 4-bit base" if report.get("quantization") else "base"
        table = Table(title=f"Verify: each artefact against {trained} + adapter in PEFT, as trained")
        for col in ("engine", "compared", "max |logit diff|", "tolerance", "greedy agreement", "adapter effect",
                    "verdict"):
            table.add_column(col)
        for r in report["engines"]:
            table.add_row(r["engine"], r["compared"], f"{r['max_logit_diff']:.2e}", r["rule"],
                          f"{r['greedy_agreement']:.1%}", f"{r['adapter_effect']:.2e}",
                          "[green]pass[/]" if r["ok"] else "[bold red]FAIL[/]")
        console.print(table)
        render_findings(findings)
        console.print(f"written: {report['paths']['markdown']}")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def repair(
    base: Annotated[str, typer.Option("--base", help="The official base checkpoint the artefact was made from")],
    out: Annotated[Path, typer.Option("--out", help="Where the repaired adapter or checkpoint goes (new directory)")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="An adapter made on unwrapped towers; with "
                                                 "--merged, the adapter it was merged from (to verify against)")] = None,
    merged: Annotated[Path | None, typer.Option("--merged", help="A merged checkpoint saved from unwrapped towers")
                      ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Put an artefact made with the "unwrap" fix (row 2) back into the official layout, exactly, and verify it:
    an adapter's tower factors onto the inner .linear, or a merged checkpoint's renamed keys back (clamp buffers
    and KV-shared keys from the base). What cannot be repaired exactly is refused with the reason."""
    from gemma4_tune.verify.repair import repair_adapter, repair_merged

    if merged is None and adapter is None:
        raise typer.BadParameter("give --adapter (an adapter to repair) or --merged (a checkpoint to repair)")
    try:
        report = repair_merged(base, merged, out, adapter) if merged else repair_adapter(base, adapter, out)
    except FindingError as exc:
        _fail(exc)
    findings = report.pop("findings")
    if json_out:
        print_json({**report, "findings": [f.to_dict() for f in findings]})
        return
    if merged:
        typer.echo(f"repaired {out}: {report['renamed']} keys renamed back to .linear, {report['from_base']} clamp "
                   "and KV-shared keys taken from the base")
    else:
        typer.echo(f"repaired {out}: {report['renamed_modules']} modules moved onto their inner .linear "
                   f"(e.g. {report['example']})")
    verified = report["verify"]
    if "max_logit_diff" in verified:
        typer.echo(f"verified against base + adapter in PEFT: max |logit diff| {verified['max_logit_diff']:.2e}, "
                   f"adapter effect {verified['adapter_effect']:.2e} ({verified['compared']})")
    render_findings(findings)


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run directories (the --out of `train`), two or more")],
    out: Annotated[Path, typer.Option("--out", help="Where compare.md/.json/.png go")] = Path("compare"),
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Several runs' metrics in one table and one plot: loss and held-out loss against step and tokens."""
    from gemma4_tune.report.compare import compare_runs

    try:
        report = compare_runs(runs, out)
    except FindingError as exc:
        _fail(exc)
    if json_out:
        print_json(report)
        return
    table = Table(title="Runs")
    for col in ("run", "method", "steps", "tokens", "final loss", "held-out loss", "held-out accuracy",
                "held-out reward accuracy", "tokens/s"):
        table.add_column(col)
    for r in report["runs"]:
        start, end = r["eval_loss_start"], r["eval_loss_end"]
        acc0, acc1 = r["eval_accuracy_start"], r["eval_accuracy_end"]
        rew0, rew1 = r["eval_reward_accuracy_start"], r["eval_reward_accuracy_end"]
        table.add_row(r["name"], r["method"], str(r["steps"]), str(r["tokens"]), f"{r['final_loss']:.4f}",
                      "-" if start is None else f"{start:.4f} -> {end:.4f}",
                      "-" if acc0 is None else f"{acc0:.1%} -> {acc1:.1%}",
                      "-" if rew0 is None else f"{rew0:.1%} -> {rew1:.1%}", f"{r['tokens_per_s']:.0f}")
    console.print(table)
    console.print(f"written: {report['markdown']} and {report['plot']}")


@app.command()
def serve(
    base: Annotated[str, typer.Option("--base", help="Base model directory")],
    adapters: Annotated[list[str] | None, typer.Option("--adapter", help="Adapter to serve, DIR or NAME=DIR "
                                                       "(repeatable)")] = None,
    merged: Annotated[Path | None, typer.Option("--merged", help="Serve this merged checkpoint instead (with "
                                                "--adapter, --smoke compares it with base + that adapter)")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1 (0: any free one)")
                    ] = 8000,
    smoke: Annotated[bool, typer.Option("--smoke", help="Send one request per served model, compare it with "
                                        "transformers + PEFT, then stop")] = False,
    text_only: Annotated[bool, typer.Option("--text-only", help="Serve only the text part of an adapter with "
                                            "tower LoRA")] = False,
    max_model_len: Annotated[int | None, typer.Option("--max-model-len", min=16, help="Context length "
                                                      "[config's, at most 8192]")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Engine dtype [the checkpoint's]")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable summary at the end")] = False,
) -> None:
    """Serve the base model and adapters with vLLM's OpenAI-compatible server on 127.0.0.1 (flags chosen for
    Gemma 4), print a curl example; with --smoke, check each served model against the trained one and stop."""
    from gemma4_tune.serve import serve as run_serve

    try:
        report = run_serve(base, adapters or [], merged=merged, port=port, run_smoke=smoke, text_only=text_only,
                           dtype=dtype, max_model_len=max_model_len,
                           log=lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True))
    except FindingError as exc:
        _fail(exc)
    findings = report.pop("findings")
    if json_out:
        print_json({**report, "findings": [f.to_dict() for f in findings]})
    elif report.get("smoke"):
        table = Table(title="Serve smoke: each served model against transformers + PEFT")
        for col in ("model", "greedy agreement", "max |logprob diff|", "adapter effect", "verdict"):
            table.add_column(col)
        for r in report["smoke"]:
            effect = "-" if r["adapter_effect"] is None else f"{r['adapter_effect']:.2e}"
            measured = r["greedy_agreement"] is not None
            table.add_row(r["model"], f"{r['greedy_agreement']:.1%}" if measured else "not verified",
                          f"{r['max_logprob_diff']:.2e}" if measured else "not verified", effect,
                          "[green]pass[/]" if r["ok"] else "[bold red]FAIL[/]")
        console.print(table)
    if not json_out:
        render_findings(findings)
    if has_errors(findings):
        raise typer.Exit(1)


engines_app = typer.Typer(help="Serving engines in their own environments (vLLM, llama.cpp).", no_args_is_help=True)
app.add_typer(engines_app, name="engines")


@engines_app.command("install")
def engines_install(
    engine: Annotated[str, typer.Argument(help="vllm or llama.cpp")],
    force: Annotated[bool, typer.Option("--force", help="Reinstall even if present")] = False,
) -> None:
    """Install an engine outside the repository, cached: vLLM in its own virtual environment; llama.cpp's
    converters (from the llama-cpp-python sdist) and a prebuilt libllama."""
    from gemma4_tune.engines.llamacpp_env import install_llamacpp
    from gemma4_tune.engines.vllm_env import install_vllm

    installers = {"vllm": lambda: install_vllm(force=force), "llama.cpp": lambda: install_llamacpp(force=force).root}
    if engine not in installers:
        _fail(FindingError(finding(UNKNOWN_ENGINE.code, f"unknown engine {engine!r}", "use: vllm or llama.cpp")))
    try:
        path = installers[engine]()
    except FindingError as exc:
        _fail(exc)
    typer.echo(f"{engine} environment: {path}")


@engines_app.command("status")
def engines_status(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Where the engine environments are and whether they are ready."""
    from gemma4_tune.engines.llamacpp_env import llamacpp_status
    from gemma4_tune.engines.vllm_env import vllm_status

    status = {"vllm": vllm_status(size=True), "llama.cpp": llamacpp_status()}
    if json_out:
        print_json(status)
    else:
        for engine, values in status.items():
            console.print(f"[bold]{engine}[/]")
            for key, value in values.items():
                if key != "stamp":
                    console.print(f"  {key}: {value}")


def _quiet_libraries() -> None:
    """Our progress and findings are the output; silence library progress bars and known noise."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # torchao (the low-bit optimizers, imported by PEFT through transformers) registers enums with torch's pytree
    # and looks for a CUDA toolkit at import: torch logs both on every command, nothing a user can act on
    for name in ("torch.utils._pytree", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    try:
        with json_only_stdout() if "--json" in sys.argv[1:] else contextlib.nullcontext():
            app()
    except Exception as exc:
        if _state["debug"]:
            raise
        from gemma4_tune.io import write_error

        # a full disk or read-only filesystem met outside a guarded write is still a finding, not an internal error
        found = write_error(exc, exc.filename or ".", "the command's output") if isinstance(exc, OSError) else None
        if found is not None:
            render_findings([found], stderr=True)
            raise SystemExit(1) from None
        err_console.print("[bold red]internal error[/] (run again with --debug for the traceback):")
        err_console.print(traceback.format_exc().strip().splitlines()[-1], markup=False)
        raise SystemExit(1) from None
