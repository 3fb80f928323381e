"""Trainer callbacks: progress on the terminal, metrics on disk, checkpoints moved into place whole."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gemma4_tune.console import console
from gemma4_tune.findings import Finding, Severity, finding, register
from gemma4_tune.io import json_text, write_text_atomic
from gemma4_tune.ranks import all_reduce, barrier, is_main_process, local_data

NON_FINITE = register("G4T403", Severity.ERROR, "Loss or gradient became NaN/inf during training", (19,))
ZERO_GRADIENT = register("G4T404", Severity.ERROR, "Gradient norm stuck at zero", (12, 21))
LORA_STALLED = register("G4T405", Severity.ERROR, "LoRA weights are not moving", (21,))
CHECKPOINT_SKIPPED = register("G4T416", Severity.WARNING, "--resume skipped damaged or foreign checkpoint folders")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TokenCounter:
    """Counts real (non-pad) tokens that went through the collator: the numerator of tokens/s.

    ``tokens`` counts this process's batches; ``total`` is the count over all processes at the last
    ``sync`` (every process must call it at the same point, as ``on_log`` does).
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.total = 0

    def add(self, n: int) -> None:
        """Record one batch's tokens."""
        self.tokens += n

    def sync(self) -> int:
        """Update and return ``total``, the tokens of all processes so far."""
        self.total = int(all_reduce(float(self.tokens)))
        return self.total


class MetricsCallback(TrainerCallback):
    """Appends every log line (step, loss, lr, grad norm, tokens, tokens/s) to ``metrics.jsonl``."""

    def __init__(self, path: Path, counter: TokenCounter) -> None:
        self.path = path
        self.counter = counter
        self.started = time.perf_counter()
        self.tokens_at_start = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.tokens_at_start = self.counter.sync()
        if not is_main_process():
            return
        if state.global_step == 0 and self.path.exists():
            self.path.unlink()
        elif state.global_step:
            _truncate_metrics(self.path, state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        tokens = self.counter.sync()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs,
               "tokens": tokens, "tokens_per_s": round((tokens - self.tokens_at_start) / elapsed, 2)}
        if is_main_process():
            append_metrics_row(self.path, row)


def append_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """One row appended to ``metrics.jsonl``, as strict JSON on one line (a NaN figure is null)."""
    with path.open("a") as handle:
        handle.write(json_text(row, indent=None) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again), and a last
    line cut short by the kill (or full disk) that stopped the run; rewritten atomically."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # only the line being written when the process died can be cut
            lines.pop()
    rows = [line for line in lines if json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(r + "\n" for r in rows))


class ProgressCallback(TrainerCallback):
    """A rich progress bar: step, loss, tokens/s and ETA."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.progress: Progress | None = None
        self.task: Any = None
        self.loss = float("nan")
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False, disable=not console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", tps="-")
        self.started = time.perf_counter()
        self.tokens_at_start = self.counter.total

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            if not console.is_terminal:
                console.print(f"step {state.global_step}/{state.max_steps} loss {self.loss:.4f}")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.progress is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            tps = (self.counter.total - self.tokens_at_start) / elapsed
            self.progress.update(self.task, completed=state.global_step, loss=f"{self.loss:.4f}", tps=f"{tps:.0f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()


class AtomicCheckpointCallback(TrainerCallback):
    """The Trainer writes ``checkpoint-N`` into a staging folder; once complete it is renamed into place.

    A run killed mid-save therefore never leaves a half-written checkpoint where
    ``--resume`` looks. Only the newest ``keep`` checkpoints are kept. Under a launcher every
    process has written its part (DeepSpeed writes one per process) before rank 0 moves it.
    """

    def __init__(self, staging: Path, final: Path, keep: int) -> None:
        self.staging = staging
        self.final = final
        self.keep = keep

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        barrier()
        name = f"checkpoint-{state.global_step}"
        src = self.staging / name
        if not is_main_process() or not src.is_dir():
            barrier()
            return
        self.final.mkdir(parents=True, exist_ok=True)
        dst = self.final / name
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
        for old in complete_checkpoints(self.final)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        barrier()


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint to resume from, or None when it is one.

    Cheap, from headers and directories only: the name ``checkpoint-<step>``, a ``trainer_state.json``
    at that step, an ``adapter_model.safetensors`` whose header covers the file exactly, and every
    ``*.pt``/``*.pth``/``*.bin`` a readable zip archive (what ``torch.save`` writes; a cut file loses
    the archive's directory, which is at its end).
    """
    import zipfile

    from gemma4_tune.export.manifest import ADAPTER_WEIGHTS, tensors_in_file

    match = CHECKPOINT_RE.match(path.name)
    if not path.is_dir():
        return "not a folder"
    if match is None:
        return "not named checkpoint-<step>"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is not valid JSON ({exc})"
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json is not at step {match.group(1)}"
    if not (path / ADAPTER_WEIGHTS).is_file():
        return f"no {ADAPTER_WEIGHTS}"
    try:
        tensors_in_file(path / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as exc:
        return f"{ADAPTER_WEIGHTS}: {exc}"
    for archive in sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".pth", ".bin") and p.is_file()):
        try:
            zipfile.ZipFile(archive).close()
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{archive.relative_to(path)} is not a complete torch file ({exc})"
    return None


def scan_checkpoints(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Complete checkpoints oldest first, and every other entry of ``folder`` with why it is no checkpoint."""
    if not folder.is_dir():
        return [], {}
    found, skipped = [], {}
    for path in sorted(folder.iterdir()):
        problem = checkpoint_problem(path)
        if problem is None:
            found.append((int(CHECKPOINT_RE.match(path.name).group(1)), path))
        else:
            skipped[path.name] = problem
    return [p for _, p in sorted(found)], skipped


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (see ``checkpoint_problem``), oldest first."""
    return scan_checkpoints(folder)[0]


def skipped_checkpoints_finding(folder: Path, skipped: dict[str, str], resume_from: Path) -> Finding:
    """G4T416: what in ``folder`` is not a complete checkpoint and why, and the one the run resumes from."""
    listed = "; ".join(f"{name}: {why}" for name, why in skipped.items())
    return finding(CHECKPOINT_SKIPPED.code, f"{folder} holds {len(skipped)} folder(s) that are not complete "
                   f"checkpoints, skipped ({listed}); resuming from {resume_from.name}, the last complete one",
                   "nothing to do if that is the checkpoint you want; remove the damaged folders to silence this "
                   "(a checkpoint-N that is damaged is rewritten when the run reaches step N again)",
                   skipped=skipped, resumed_from=resume_from.name)


class GuardCallback(TrainerCallback):
    """Stops a run that has stopped learning, before it saves anything broken.

    Non-finite loss or gradient norm, a gradient norm of zero for ``zero_grad_steps`` logged
    steps in a row, or LoRA weights that have not moved after ``stall_steps`` optimizer
    steps: training stops, the checkpoint of that step is not written (the last good one
    stays) and the finding is kept for the report.
    """

    def __init__(self, model: Any, *, zero_grad_steps: int = 3, stall_steps: int = 2) -> None:
        self.model = model
        self.zero_grad_steps = zero_grad_steps
        self.stall_steps = stall_steps
        self.zero_grad_run = 0
        self.start_step = 0
        self.snapshot: dict[str, Any] = {}
        self.findings: list[Any] = []

    def _stop(self, control: TrainerControl, code: str, message: str, fix: str) -> None:
        self.findings.append(finding(code, message, fix))
        control.should_training_stop = True
        control.should_save = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.start_step = state.global_step
        self.snapshot = {n: local_data(p).detach().clone() for n, p in self.model.named_parameters()
                         if p.requires_grad}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.snapshot and state.global_step - self.start_step == self.stall_steps:
            moved = max((float((local_data(p).detach() - self.snapshot[n]).abs().max())
                         for n, p in self.model.named_parameters() if n in self.snapshot and self.snapshot[n].numel()),
                        default=0.0)
            moved = all_reduce(moved, "max")
            self.snapshot = {}
            if moved == 0.0:
                self._stop(control, LORA_STALLED.code, f"after {self.stall_steps} optimizer steps no LoRA weight has "
                           "changed", "raise --lr (it may underflow), check that the optimizer got the LoRA "
                           "parameters and that gradients are not zero")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            self._stop(control, NON_FINITE.code, f"step {state.global_step}: loss {loss}, gradient norm {grad_norm}",
                       "lower --lr, use bf16 (never fp16) on GPU or fp32 on CPU, and check the data of that step; "
                       "--resume continues from the last good checkpoint")
            return
        self.zero_grad_run = self.zero_grad_run + 1 if grad_norm == 0 else 0
        if self.zero_grad_run >= self.zero_grad_steps:
            self._stop(control, ZERO_GRADIENT.code, f"the gradient norm was 0 for {self.zero_grad_run} steps in a row "
                       f"(up to step {state.global_step})", "check that labels are not all masked and that LoRA "
                       "targets are on the path of the loss (gemma4-tune preflight)")


def eval_interval(every: int | None, max_steps: int) -> int:
    """Steps between held-out evaluations: ``every`` (``--eval-steps``), else a quarter of the run."""
    return every or max(1, max_steps // 4)


class EvalCallback(TrainerCallback):
    """Held-out loss and accuracy before the first step (the base model), every ``every`` steps and at the end.

    Each result is appended to ``metrics.jsonl`` as an ``eval_loss`` row and kept in ``results``.
    """

    def __init__(self, model: Any, batcher: Any, examples: list[dict[str, Any]], *, every: int | None,
                 batch_size: int, metrics_path: Path, counter: TokenCounter) -> None:
        self.model, self.batcher, self.examples = model, batcher, examples
        self.every, self.batch_size = every, batch_size
        self.path, self.counter = metrics_path, counter
        self.results: list[Any] = []

    def _run(self, step: int) -> None:
        from gemma4_tune.train.evaluate import evaluate

        result = evaluate(self.model, self.batcher, self.examples, batch_size=self.batch_size, step=step)
        self.results.append(result)
        if not is_main_process():
            return
        append_metrics_row(self.path, result.to_row(self.counter.total))
        first = self.results[0]
        change = f" (step {first.step}: {first.loss:.4f}, {first.accuracy:.1%})" if len(self.results) > 1 else ""
        console.print(f"eval @ step {step}: loss {result.loss:.4f}, accuracy {result.accuracy:.1%} on "
                      f"{result.tokens} held-out tokens{change}")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.every = eval_interval(self.every, state.max_steps)
        if state.global_step == 0:
            self._run(0)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.every and state.global_step % self.every == 0 and not control.should_training_stop:
            self._run(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if not self.results or self.results[-1].step != state.global_step:
            self._run(state.global_step)
