"""The run directory: what a resume must match, when there is nothing left to train, and who uses it.

A fresh run records in ``run-start.json`` what its checkpoints depend on: the base (its fingerprint,
as the adapter manifest has it, plus its tokenizer files), the bytes of every data file with the
options they are read with, the LoRA settings and the training recipe. ``--resume`` compares the
same record of the new settings with it before any model is loaded (G4T414) and stops a run that
has nothing left to train (G4T415). ``train.lock`` is held with ``flock`` for the whole command, so a
second ``train`` on the same ``--out`` stops at once (G4T417); the OS frees it when the process ends,
even by SIGKILL, so a killed run can be resumed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from gemma4_tune.config.options import GRPO_SETTINGS, RunConfig
from gemma4_tune.findings import FindingError, Severity, finding, register
from gemma4_tune.io import write_json

RESUME_MISMATCH = register("G4T414", Severity.ERROR, "--resume with different settings than the run")
NOTHING_TO_DO = register("G4T415", Severity.INFO, "--resume found the run already finished")
RUN_DIR_IN_USE = register("G4T417", Severity.ERROR, "The run directory is in use")

RUN_START = "run-start.json"
LOCK_NAME = "train.lock"
#: Set by the ``--distributed`` launcher for its processes: the pid that holds the lock for the job.
LOCK_ENV = "GEMMA4_TUNE_LOCK_HOLDER"

_TOKENIZER_FILES = ("chat_template.jinja", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "processor_config.json", "special_tokens_map.json")
#: Settings a resume must keep: they decide the data order, the batches and the optimizer's steps.
RECIPE_KEYS = ("lr", "batch_size", "grad_accum", "max_seq_len", "seed", "lr_scheduler", "warmup_steps",
               "warmup_ratio", "optimizer", "optim_args", "weight_decay", "max_grad_norm", "adam_beta1",
               "adam_beta2", "adam_epsilon", "packing", "train_on", "template_revision", "skip_invalid",
               "quantize", "quant_type", "double_quant", "compute_dtype", "quantize_experts",
               "distributed")
_HELD: dict[Path, int] = {}  # lock file -> descriptor, for the run directories this process holds


# --------------------------------------------------------------------------- the run record


def content_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of every file under a directory (names and bytes, in name order).

    None when nothing is there (the data check reports that later).
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _base_identity(model: Path) -> dict[str, Any] | None:
    """The base fingerprint of the adapter manifest plus the tokenizer files; None when it cannot be read."""
    from gemma4_tune.export.manifest import base_fingerprint

    try:
        fingerprint = base_fingerprint(model)
    except FindingError:  # not a checkpoint: the method's data and model loading say so (G4T001/G4T804)
        return None
    tokenizer = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (model / name).is_file():
            tokenizer.update(name.encode() + b"\0" + (model / name).read_bytes())
    return {**{k: fingerprint[k] for k in ("config_sha256", "tensors_sha256", "sample_sha256")},
            "tokenizer_sha256": tokenizer.hexdigest()}


def run_record(cfg: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """What ``--resume`` must match, for ``cfg``: computed from files, without loading a model."""
    base = Path(cfg.model)
    return {
        "schema": 1,
        "kind": "gemma4_tune.run_start",
        "base": {"path": str(base.resolve()), "fingerprint": _base_identity(base)},
        "data": [{"path": spec.path, "sha256": content_sha256(spec.path), **spec.model_dump(exclude={"path"})}
                 for spec in cfg.data],
        "eval": {"eval_data": cfg.eval_data, "sha256": content_sha256(cfg.eval_data) if cfg.eval_data else None,
                 "eval_split": cfg.eval_split},
        "lora": {"targets": cfg.targets, "rank": cfg.rank, "alpha": cfg.alpha or 2 * cfg.rank,
                 "lora_dropout": cfg.lora_dropout},
        "recipe": {**{key: getattr(cfg, key) for key in RECIPE_KEYS}, "world_size": world_size,
                   "method": cfg.method, **({"beta": cfg.beta} if cfg.method != "sft" else {}),
                   **(_grpo_recipe(cfg) if cfg.method == "grpo" else {})},
        "length": {"max_steps": cfg.max_steps, "epochs": cfg.epochs},  # may grow on resume
    }


def _grpo_recipe(cfg: RunConfig) -> dict[str, Any]:
    """GRPO's settings, and each reward file's content hash: a resume with another reward trains another run."""
    rewards = []
    for spec in cfg.rewards:
        where = spec.rpartition(":")[0]
        rewards.append({"spec": spec, "sha256": content_sha256(where) if where.endswith(".py") and Path(where).is_file()
                        else None})
    return {**{key: getattr(cfg, key) for key in GRPO_SETTINGS if key != "rewards"}, "rewards": rewards}


def write_run_start(out: Path, record: dict[str, Any]) -> Path:
    """Write ``run-start.json`` atomically, as strict JSON."""
    return write_json(out / RUN_START,
                      {**record, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def _short(sha: str | None) -> str:
    return "missing" if sha is None else f"sha256 {sha[:12]}"


def record_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every field of the run record that differs, as ``field: old -> new`` (the length excepted)."""
    changes = []
    old_base, new_base = old.get("base", {}), new["base"]
    if (old_base.get("fingerprint") or {}) != (new_base["fingerprint"] or {}):
        parts = {"config_sha256": "config", "tensors_sha256": "tensor names/shapes", "sample_sha256": "weights",
                 "tokenizer_sha256": "tokenizer/chat template"}
        before, after = old_base.get("fingerprint") or {}, new_base["fingerprint"] or {}
        differ = [what for key, what in parts.items() if before.get(key) != after.get(key)]
        changes.append(f"base model: {old_base.get('path')} -> {new_base['path']} ({', '.join(differ)} differ)")
    old_data, new_data = old.get("data", []), new["data"]
    if len(old_data) != len(new_data):
        changes.append(f"data: {' + '.join(d.get('path', '?') for d in old_data)} -> "
                       f"{' + '.join(d['path'] for d in new_data)}")
    else:
        for i, (before, after) in enumerate(zip(old_data, new_data, strict=True)):
            label = "data" if len(new_data) == 1 else f"data {i + 1}"
            if before.get("sha256") != after["sha256"]:
                changes.append(f"{label}: {before.get('path')} ({_short(before.get('sha256'))}) -> {after['path']} "
                               f"({_short(after['sha256'])})")
            changes += [f"{label} {key}: {_show(before.get(key))} -> {_show(value)}" for key, value in after.items()
                        if key not in ("path", "sha256") and before.get(key) != value]
    old_eval, new_eval = old.get("eval", {}), new["eval"]
    if old_eval.get("sha256") != new_eval["sha256"]:
        changes.append(f"eval_data: {old_eval.get('eval_data') or 'none'} ({_short(old_eval.get('sha256'))}) -> "
                       f"{new_eval['eval_data'] or 'none'} ({_short(new_eval['sha256'])})")
    if old_eval.get("eval_split") != new_eval["eval_split"]:
        changes.append(f"eval_split: {_show(old_eval.get('eval_split'))} -> {_show(new_eval['eval_split'])}")
    for section in ("lora", "recipe"):
        before = {"method": "sft", **old.get(section, {})} if section == "recipe" else old.get(section, {})
        after = new[section]  # a key only the old record has (a DPO run's beta) is a change too
        changes += [f"{key}: {_show(before.get(key))} -> {_show(after.get(key))}"
                    for key in [*after, *(k for k in before if k not in after)] if before.get(key) != after.get(key)]
    return changes


def check_resume(out: Path, record: dict[str, Any], checkpoint: Path) -> None:
    """Refuse a resume whose settings differ from the run's (G4T414); stop one with nothing to train (G4T415).

    ``record`` is ``run_record`` of the new settings, ``checkpoint`` the one the run would resume from. A
    run directory made before run-start.json existed is resumed without the comparison.
    """
    path = out / RUN_START
    fix = (f"resume with the run's own settings (they are in {path}), or start a new run with another --out; "
           "on resume only --max-steps/--epochs may grow (logging, saving, eval-interval and sample settings "
           "may change too)")
    started: dict[str, Any] = {}
    if path.is_file():
        try:
            started = json.loads(path.read_text())
        except ValueError as exc:
            raise FindingError(finding(RESUME_MISMATCH.code, f"{path} is not valid JSON ({exc}): what the run "
                                       "was started with is unknown", fix)) from exc
    changes = record_changes(started, record) if started else []
    if changes:
        raise FindingError(finding(RESUME_MISMATCH.code, f"--resume of {out} with settings other than those it "
                                   f"was started with: {'; '.join(changes)}", fix, changes=changes))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, planned = int(state["global_step"]), int(state.get("max_steps", 0))
    length, started_length = record["length"], started.get("length")
    if length["max_steps"] > 0:
        target: int | None = length["max_steps"]
    elif started_length and started_length["max_steps"] <= 0 and length["epochs"] <= started_length["epochs"]:
        target = planned
    else:
        target = None  # a longer run by epochs: the Trainer counts its steps from the data
    if target is None or step < target:
        return
    adapter = out / "adapter" / "adapter_model.safetensors"
    where = (f"its adapter is {adapter.parent}" if adapter.is_file() else
             f"the run stopped before writing adapter/: {checkpoint} holds the same LoRA weights (a PEFT adapter "
             "directory)")
    raise FindingError(finding(NOTHING_TO_DO.code, f"nothing to train: {out} has trained {step} steps and this run "
                               f"asks for {target}; {where}", "to train longer, resume with a larger --max-steps (or "
                               "--epochs)", step=step, max_steps=target))


# --------------------------------------------------------------------------- the lock


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _in_use(out: Path, pid: str) -> FindingError:
    return FindingError(finding(RUN_DIR_IN_USE.code, f"{out} is in use by another `gemma4-tune train` (pid {pid}, "
                                f"which holds {out / LOCK_NAME})", f"wait for it to finish, or stop it (kill {pid}) "
                                "and continue it with --resume; to train beside it, choose another --out",
                                pid=pid))


def check_not_in_use(out: Path) -> None:
    """G4T417 when another process holds ``out``'s lock; takes nothing (this process may hold it already)."""
    path = Path(out) / LOCK_NAME
    if path.resolve() in _HELD or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(path)
        if pid != os.environ.get(LOCK_ENV):
            raise _in_use(Path(out), pid) from None
    finally:
        os.close(fd)


def lock_run_dir(out: Path) -> None:
    """Hold ``out``'s lock (``train.lock``, holding this pid) until ``release_run_dir`` or the process ends.

    Raises G4T417 naming the holder when another process has it. Inside a ``--distributed`` job the
    launcher holds it for every process (``LOCK_ENV``).
    """
    out = Path(out)
    path = out / LOCK_NAME
    if path.resolve() in _HELD:
        return
    out.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _holder(path)
            if pid == os.environ.get(LOCK_ENV):
                return
            raise _in_use(out, pid) from None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the holder removed the file while we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path.resolve()] = fd


def release_run_dir(out: Path | str | None) -> None:
    """Free ``out``'s lock if this process holds it (the lock file is removed first)."""
    if out is None:
        return
    path = Path(out) / LOCK_NAME
    fd = _HELD.pop(path.resolve(), None)
    if fd is None:
        return
    path.unlink(missing_ok=True)
    os.close(fd)
