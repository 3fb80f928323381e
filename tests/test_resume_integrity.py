"""Resume integrity (G4T414/415/416/401), the run directory's lock (G4T417) and damaged adapters (G4T805).

One real tiny run (2 steps, a checkpoint after each) is trained once; each test works on a copy of it
and damages or resumes it the way a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_tune.config.options import build_config
from gemma4_tune.findings import FindingError, Severity

CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
SETTINGS = {"max_steps": 2, "save_steps": 1, "batch_size": 2, "lr": 1e-2, "seed": 3, "samples": 0}


def _chat(path: Path, n: int = 8, offset: int = 0) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(offset, offset + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model: Path, data: Path, out: Path, **changes: object):
    return build_config({"model": str(model), "data": str(data), "out": str(out), **SETTINGS, **changes})


@pytest.fixture(scope="module")
def finished(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base, data, run directory) of a real run trained to its last step."""
    from gemma4_tune.api import run_training

    root = tmp_path_factory.mktemp("resume")
    data = _chat(root / "chat.jsonl")
    run = root / "run"
    run_training(_cfg(tiny_models["31b"], data, run))
    return tiny_models["31b"], data, run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import gemma4_tune.train.base as base_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the resume was refused")

    monkeypatch.setattr(base_module, "load_model", refuse)


def test_the_run_records_what_resume_must_match_and_frees_its_lock(finished: tuple[Path, Path, Path]) -> None:
    base, data, run = finished
    record = json.loads((run / "run-start.json").read_text())
    assert record["lora"] == {"targets": "text", "rank": 16, "alpha": 32, "lora_dropout": 0.0}
    assert record["recipe"]["lr"] == 1e-2 and record["recipe"]["world_size"] == 1
    assert record["data"][0]["sha256"] and record["base"]["fingerprint"]["sample_sha256"]
    assert not (run / "train.lock").exists()


def test_resume_with_other_data_base_rank_and_lr_is_one_g4t414_before_the_model_loads(
        finished: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gemma4_tune.api import tiny_model
    from gemma4_tune.train.run import train

    base, data, run = finished
    run = _copy(run, tmp_path)
    other_base = tiny_model("31b", tmp_path / "other-base", seed=1)  # same shapes, other weights
    other_data = _chat(tmp_path / "other.jsonl", offset=100)
    _no_model_load(monkeypatch)
    with pytest.raises(FindingError) as exc:
        train(_cfg(other_base, other_data, run, resume=True, rank=8, lr=1e-3))
    (found,) = exc.value.findings
    assert found.code == "G4T414" and found.severity is Severity.ERROR
    for change in ("base model:", "(weights differ)", "data: ", "other.jsonl", "rank: 16 -> 8", "lr: 0.01 -> 0.001"):
        assert change in found.message, change
    assert "another --out" in found.fix
    assert not (run / "train.lock").exists()


def test_a_finished_run_resumed_is_g4t415_and_exits_0_without_a_step(finished: tuple[Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    base, data, run = finished
    run = _copy(run, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    proc = subprocess.run([*CLI, "train", "--model", str(base), "--data", str(data), "--out", str(run), *args,
                           "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "G4T415" in proc.stderr and "nothing to train" in proc.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_no_complete_checkpoint_is_g4t401_naming_what_is_wrong(finished: tuple[Path, Path, Path],
                                                               tmp_path: Path) -> None:
    from gemma4_tune.train.run import train

    base, data, run = finished
    run = _copy(run, tmp_path)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "trainer_state.json").unlink()
    with pytest.raises(FindingError) as exc:
        train(_cfg(base, data, run, resume=True, max_steps=4))
    assert [f.code for f in exc.value.findings] == ["G4T401"]
    assert "checkpoint-2: no trainer_state.json" in exc.value.findings[0].message


def test_checkpoint_problem_names_each_kind_of_damage(finished: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from gemma4_tune.train.callbacks import checkpoint_problem, scan_checkpoints

    run = _copy(finished[2], tmp_path)
    good = run / "checkpoints" / "checkpoint-2"
    assert checkpoint_problem(good) is None
    cases = {"cut-adapter": ("adapter_model.safetensors", "cut short"),
             "cut-optimizer": ("optimizer.pt", "not a complete torch file"),
             "bad-state": ("trainer_state.json", "not valid JSON")}
    for name, (file, reason) in cases.items():
        damaged = Path(shutil.copytree(good, tmp_path / name / good.name))
        target = damaged / file
        target.write_bytes(target.read_bytes()[:-40])
        assert reason in (checkpoint_problem(damaged) or ""), name
    (run / "checkpoints" / "foo").mkdir()
    done, skipped = scan_checkpoints(run / "checkpoints")
    assert [p.name for p in done] == ["checkpoint-1", "checkpoint-2"]
    assert skipped == {"foo": "not named checkpoint-<step>"}


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_skipped_g4t416_and_a_longer_resume_stops_at_max_steps(
        finished: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from gemma4_tune.api import run_training

    base, data, run = finished
    run = _copy(run, tmp_path)
    weights = run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    (run / "checkpoints" / "checkpoint-abc").mkdir()
    # raising max_steps, and changing logging/saving/samples, is a normal resume
    result = run_training(_cfg(base, data, run, resume=True, max_steps=4, save_steps=2, logging_steps=1))
    (skipped,) = [f for f in result.findings if f.code == "G4T416"]
    assert skipped.severity is Severity.WARNING
    assert "checkpoint-2: adapter_model.safetensors" in skipped.message and "checkpoint-abc" in skipped.message
    assert result.resumed_from.endswith("checkpoint-1")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


_HOLDER = """
import sys
from pathlib import Path
from gemma4_tune.train.rundir import lock_run_dir
lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_train_on_a_run_dir_in_use_is_g4t417_naming_the_first_pid(finished: tuple[Path, Path, Path],
                                                                          tmp_path: Path) -> None:
    from gemma4_tune.train.distributed import launch
    from gemma4_tune.train.run import train
    from gemma4_tune.train.rundir import lock_run_dir, release_run_dir

    base, data, run = finished
    run = _copy(run, tmp_path)
    fresh = tmp_path / "fresh"
    holders = [subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for path in (run, fresh)]
    try:
        for holder in holders:
            assert holder.stdout.readline().strip() == "locked"
        for cfg in (_cfg(base, data, run, resume=True, max_steps=4), _cfg(base, data, fresh)):
            with pytest.raises(FindingError) as exc:
                train(cfg)
            (found,) = exc.value.findings
            pid = holders[0 if cfg.resume else 1].pid
            assert found.code == "G4T417" and f"pid {pid}" in found.message
        with pytest.raises(FindingError) as exc:
            launch(_cfg(base, data, run, resume=True, distributed="ddp"))
        assert [f.code for f in exc.value.findings] == ["G4T417"]
        # killed, the holder's lock is freed by the OS: the directory can be taken (and resumed) at once
        holders[0].send_signal(signal.SIGKILL)
        holders[0].wait()
        assert (run / "train.lock").read_text().strip() == str(holders[0].pid)
        lock_run_dir(run)
        assert (run / "train.lock").read_text().strip() == str(os.getpid())
        release_run_dir(run)
        assert not (run / "train.lock").exists()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


@pytest.fixture(scope="module")
def adapter(finished: tuple[Path, Path, Path]) -> Path:
    return finished[2] / "adapter"


@pytest.mark.parametrize("damage", ["cut", "garbage", "trailing", "config-json", "config-list"])
def test_a_truncated_or_corrupt_adapter_is_g4t805_in_export_verify_serve_and_repair(
        finished: tuple[Path, Path, Path], adapter: Path, tmp_path: Path, damage: str) -> None:
    from gemma4_tune.api import export, verify
    from gemma4_tune.serve import plan_serving
    from gemma4_tune.verify.repair import repair_adapter

    base = finished[0]
    broken = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    weights, config = broken / "adapter_model.safetensors", broken / "adapter_config.json"
    data = weights.read_bytes()
    if damage == "cut":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif damage == "trailing":
        weights.write_bytes(data + b"\0" * 8)
    elif damage == "config-json":
        config.write_text(config.read_text()[:40])
    else:
        config.write_text("[16]")
    expected = {"cut": "cut short", "garbage": "not a safetensors file", "trailing": "trailing bytes",
                "config-json": "not valid JSON", "config-list": "not an object"}[damage]
    calls = [lambda: export(base, broken, engines=("transformers", "vllm", "llama.cpp")),
             lambda: verify(base, broken, engines=("peft",), out=tmp_path / "verify"),
             lambda: plan_serving(base, {"a": broken}, tmp_path / "serve", flavour="cpu"),
             lambda: repair_adapter(base, broken, tmp_path / "repaired")]
    for call in calls:
        with pytest.raises(FindingError) as exc:
            call()
        assert [f.code for f in exc.value.findings] == ["G4T805"]
        assert expected in exc.value.findings[0].message


def test_a_metrics_line_cut_by_the_kill_is_dropped_on_resume(tmp_path):
    """A kill or a full disk mid-write leaves the last metrics line cut short: resume drops it, keeps the rest."""
    from gemma4_tune.train.callbacks import _truncate_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    _truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
