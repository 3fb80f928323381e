"""Faults of the filesystem: nothing of the user's deleted, full disks, unwritable outputs, strict and atomic
records, and what killed writes leave behind (G4T004, G4T020, G4T021, G4T022)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from gemma4_tune.findings import FindingError
from gemma4_tune.io import (
    atomic_directory,
    check_writable,
    json_text,
    output_errors,
    remove_stale_temps,
    write_json,
)
from tests.test_merge import _synthetic

DiskUsage = namedtuple("DiskUsage", "total used free")


def codes(exc: pytest.ExceptionInfo) -> list[str]:
    return [f.code for f in exc.value.findings]


def _strict_loads(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _chat(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture()
def unwritable(tmp_path: Path) -> Path:
    """A real output location nothing can be written to: under a read-only folder, or (as root, for whom
    permissions do not apply) under a regular file."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder / "out"
        folder.chmod(0o755)
        return
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    yield blocker / "out"


# --------------------------------------------------------------------------- 1. nothing of the user's deleted


def test_a_users_file_in_run_survives_demo_out(tmp_path):
    from gemma4_tune.demo import run_demo

    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "notes.txt").write_text("mine\n")
    with pytest.raises(FindingError) as exc:
        run_demo(out)  # refuses before any work starts
    assert codes(exc) == ["G4T004"] and "not written by `gemma4-tune demo`" in exc.value.findings[0].message
    assert (out / "run" / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["run"]


def test_the_demo_replaces_only_its_own_earlier_run_and_merge(tmp_path):
    from gemma4_tune.demo import DEMO_MARKER, _record_written, demo_outputs

    out = tmp_path / "demo"
    assert demo_outputs(out) == []
    (out / "run" / "adapter").mkdir(parents=True)
    (out / DEMO_MARKER).write_text("{}\n")
    for name in ("report.json", "metrics.jsonl", ".report.html.tmp-123-ab12cd34", "new-record.json"):
        (out / "run" / name).write_text("{}\n")
    with pytest.raises(FindingError) as exc:  # not a name a run writes, and the demo did not record it
        demo_outputs(out)
    assert codes(exc) == ["G4T004"] and "new-record.json" in exc.value.findings[0].message
    _record_written(out)  # what the demo notes at its end: all of run/ is its own now
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"x")
    (out / "merged" / "gemma4_tune_merge.json").write_text(json.dumps(
        {"files": ["gemma4_tune_merge.json", "model.safetensors"]}))
    assert demo_outputs(out) == [out / "run", out / "merged"]

    (out / "run" / "notes.txt").write_text("mine\n")
    with pytest.raises(FindingError) as exc:
        demo_outputs(out)
    assert codes(exc) == ["G4T004"] and "notes.txt" in exc.value.findings[0].message
    (out / "run" / "notes.txt").unlink()
    (out / "merged" / "extra.bin").write_bytes(b"y")
    with pytest.raises(FindingError) as exc:
        demo_outputs(out)
    assert codes(exc) == ["G4T004"] and "extra.bin" in exc.value.findings[0].message


# --------------------------------------------------------------------------- 2. disk full


def test_merge_needing_more_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    from gemma4_tune.export.merge import merge_adapter, merged_size

    base, adapter, _ = _synthetic(tmp_path)
    needed = merged_size(base)
    assert needed == 8 * 4 * 4 + 4 * 4  # the base's two fp32 tensors
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 100, 100))
    with pytest.raises(FindingError) as exc:
        merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert codes(exc) == ["G4T020"]
    found = exc.value.findings[0]
    assert (found.details["needed_bytes"], found.details["free_bytes"]) == (needed, 100)
    assert "writing the merged checkpoint needs about 144 B" in found.message and "only 100 B is free" in found.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_disk_full_while_merging_is_a_finding_and_leaves_nothing(tmp_path, monkeypatch):
    from gemma4_tune.export import merge as merge_mod

    base, adapter, _ = _synthetic(tmp_path)

    def fill_up(fh, data, offset):  # the shard's header finds the disk full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fh.name)

    monkeypatch.setattr(merge_mod, "_write_tensor_bytes", fill_up)
    with pytest.raises(FindingError) as exc:
        merge_mod.merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert codes(exc) == ["G4T020"] and "filled up while writing the merged checkpoint" in exc.value.findings[0].message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_disk_full_in_the_kernel_copy_is_a_finding_and_leaves_nothing(tmp_path, monkeypatch):
    """Unchanged tensors are copied by copy_file_range, outside _write_tensor_bytes: its ENOSPC is G4T020 too."""
    from gemma4_tune.export import merge as merge_mod

    base, adapter, _ = _synthetic(tmp_path)

    def fill_up(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", fill_up)
    with pytest.raises(FindingError) as exc:
        merge_mod.merge_adapter(base, adapter, tmp_path / "merged", progress=False)
    assert codes(exc) == ["G4T020"] and "filled up while writing the merged checkpoint" in exc.value.findings[0].message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_disk_full_while_writing_the_report_keeps_the_old_one_whole(tmp_path, monkeypatch):
    from gemma4_tune import io
    from gemma4_tune.report.run_report import write_report

    sections = {"config": {"out": str(tmp_path)}, "metrics": [{"step": 1, "loss": 2.0}]}
    write_report(tmp_path, sections, [])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"report.json", "report.md", "report.html", "loss.png"}

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(FindingError) as exc, output_errors(tmp_path, "the run's report"):
        write_report(tmp_path, {**sections, "metrics": [{"step": 1, "loss": 1.0}]}, [])
    assert codes(exc) == ["G4T020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temp files left
    assert (tmp_path / "report.json").read_bytes() == before["report.json"]  # the old report, whole


def test_disk_full_during_a_checkpoint_stops_training_with_a_finding(tiny_models, tmp_path, monkeypatch):
    import torch

    from gemma4_tune.api import run_training
    from gemma4_tune.config.options import RunConfig

    real = torch.save

    def full_on_checkpoint(obj, f, *args, **kwargs):
        if "checkpoint-" in str(f):
            Path(f).write_bytes(b"\0" * 64)  # what a write cut short leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_checkpoint)
    out = tmp_path / "run"
    cfg = RunConfig(model=str(tiny_models["e2b"]), data=str(_chat(tmp_path / "chat.jsonl")), out=str(out),
                    max_steps=1, save_steps=1, samples=0, preflight=False)
    with pytest.raises(FindingError) as exc:
        run_training(cfg)
    assert codes(exc) == ["G4T020"] and "/.staging/checkpoint-1/" in exc.value.findings[0].details["path"]
    assert not (out / ".staging").exists() and not (out / "adapter").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


# --------------------------------------------------------------------------- 3. unwritable output


def test_an_unwritable_output_is_refused_before_any_model_loads(tiny_models, tmp_path, unwritable):
    from gemma4_tune.api import export, run_training, tiny_model, verify
    from gemma4_tune.config.options import RunConfig
    from gemma4_tune.demo import run_demo

    missing = tmp_path / "no-such-model"  # a model that would be loaded first fails with G4T001 instead
    data = _chat(tmp_path / "chat.jsonl")
    attempts = {
        "tiny-model --out": lambda: tiny_model("e2b", unwritable),
        "export --merged": lambda: export(missing, missing / "adapter", merged=unwritable),
        "verify --out": lambda: verify(missing, missing / "adapter", out=unwritable),
        "train --out": lambda: run_training(RunConfig(model=str(missing), data=str(data), out=str(unwritable))),
        "demo --out": lambda: run_demo(unwritable),
    }
    for what, attempt in attempts.items():
        with pytest.raises(FindingError) as exc:
            attempt()
        assert codes(exc) == ["G4T021"], what
        assert str(unwritable) in exc.value.findings[0].message, what
    assert not unwritable.exists()


def test_a_writable_location_passes_and_leaves_no_probe(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "--out")
    check_writable(tmp_path, "--out", whole=True)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 4. strict, atomic JSON


def test_records_are_strict_json_with_null_for_nan_and_infinity(tmp_path):
    from gemma4_tune.report.run_report import write_report

    data = {"loss": float("nan"), "rows": [float("inf"), -float("inf"), 1.5], "nested": {"grad": float("nan")},
            "pair": (1, float("nan"))}
    path = write_json(tmp_path / "record.json", data)
    assert _strict_loads(path.read_text()) == {"loss": None, "rows": [None, None, 1.5], "nested": {"grad": None},
                                               "pair": [1, None]}
    assert _strict_loads(json_text({"loss": float("nan")}, indent=None)) == {"loss": None}
    write_report(tmp_path, {"metrics": [{"step": 1, "loss": float("nan"), "grad_norm": float("inf")}]}, [])
    report = _strict_loads((tmp_path / "report.json").read_text())
    assert report["metrics"] == [{"step": 1, "loss": None, "grad_norm": None}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "record.json", "report.html", "report.json",
                                                          "report.md"]


# --------------------------------------------------------------------------- 5. what killed writes leave


_WRITER = """
import sys, time
from pathlib import Path
from gemma4_tune.io import atomic_directory
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "merged"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    (stale,) = tmp_path.glob(".merged.tmp-*")
    assert stale.name.startswith(f".merged.tmp-{writer.pid}-")
    live = tmp_path / f".merged.tmp-{os.getpid()}-inprogress"  # a write still running (this process)
    live.mkdir()

    found = remove_stale_temps(out)
    assert found is not None and found.code == "G4T022" and found.severity.value == "info"
    assert found.details["removed"] == [stale.name] and found.details["freed_bytes"] == 100_000
    assert not stale.exists() and live.is_dir()
    assert remove_stale_temps(out) is None

    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "merged"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
