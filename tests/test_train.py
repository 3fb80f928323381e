"""Training end to end on tiny models: outputs, YAML, bad data, loss scaling, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]


def cli(*args: str, timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


#: Runs whose adapters are compared to 1e-7 use the same torch thread count: otherwise it follows the cores idle
#: when each starts (gemma4_tune.threads), and another reduction order moves fp32 results (tests run two at a time).
SAME_THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma4_tune.data.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo-data"), n=24)


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(12)]
    rows.append({"prompt": "Say hello.", "completion": "Hello!"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_multimodal_e2b_run_writes_adapter_checkpoints_metrics_and_report(tiny_models, demo_data, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", "--model", tiny_models["e2b"], "--data", demo_data, "--out", out,
               "--targets", "text,vision,audio", "--max-steps", 4, "--save-steps", 2, "--batch-size", 2, "--lr", 5e-3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/target_plan.json",
                 "metrics.jsonl", "report.json", "report.md", "report.html", "loss.png", "run.json",
                 "checkpoints/checkpoint-4/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / ".staging").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 and m["loss"] > 0 for m in metrics)
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["modalities"] == {"text": 10, "image": 8, "audio": 6} or report["data"]["kept"] == 24
    assert report["data"]["supervised_tokens"] > 0 and report["data"]["template_revision"] == "v5"
    assert set(report["plan"]["trainable"]) == {"text", "vision", "audio", "total"}
    keys = adapter_tensors(out)
    assert any(".vision_tower." in k for k in keys) and any(".audio_tower." in k for k in keys)
    assert "## Curves" in (out / "report.md").read_text()


@pytest.mark.slow
def test_text_only_31b_run_from_yaml_and_loss_goes_down(tiny_models, text_data, tmp_path):
    out = tmp_path / "run"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"base_model: {tiny_models['31b']}\ndata: {text_data}\noutput_dir: {out}\n"
                        "max_steps: 12\nlearning_rate: 0.01\nmicro_batch_size: 4\nlora_r: 8\nadapter: lora\n")
    proc = cli("train", run_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["last loss"] < report["summary"]["first loss"]
    assert report["config"]["rank"] == 8


@pytest.mark.slow
def test_bad_row_stops_before_the_model_is_loaded_and_skip_invalid_reports_it(tiny_models, text_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text_data.read_text() + '{"messages": [{"role": "user", "content": "cut\n')
    proc = cli("train", "--model", tiny_models["31b"], "--data", bad, "--out", tmp_path / "r1", "--max-steps", 1)
    assert proc.returncode == 1 and "G4T301" in proc.stderr and "bad.jsonl:14" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = cli("train", "--model", tiny_models["31b"], "--data", bad, "--out", tmp_path / "r2", "--max-steps", 1,
               "--skip-invalid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "r2" / "report.json").read_text())["data"]
    assert data["kept"] == 13 and sum(data["dropped"].values()) == 1


@pytest.mark.slow
def test_row26_accumulated_step_equals_the_big_batch_step(tiny_models, text_data, tmp_path):
    runs = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 1, 4)):
        out = tmp_path / name
        proc = cli("train", "--model", tiny_models["31b"], "--data", text_data, "--out", out, "--max-steps", 1,
                   "--batch-size", bs, "--grad-accum", accum, "--lr", 1e-2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # Same tokens, same weights: the step's loss and gradient norm must not depend on how it was split.
    # (Adam's first update is ~lr * sign(g), so comparing adapters would only amplify rounding noise.)
    assert runs["big"]["loss"] == pytest.approx(runs["accum"]["loss"], rel=1e-5)
    assert runs["big"]["grad_norm"] == pytest.approx(runs["accum"]["grad_norm"], rel=1e-4)


def kill_at_checkpoint(args: list, out: Path, checkpoint: str) -> None:
    """Start ``train ARGS --out OUT`` and SIGKILL it once OUT/checkpoints/CHECKPOINT is complete."""
    victim = subprocess.Popen([*CLI, "train", *map(str, args), "--out", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=SAME_THREADS)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / checkpoint).is_dir():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_models, text_data, tmp_path):
    args = ["--model", tiny_models["31b"], "--data", text_data, "--max-steps", 8, "--save-steps", 2,
            "--batch-size", 2, "--lr", 1e-2, "--seed", 3]
    reference = tmp_path / "reference"
    proc = cli("train", *args, "--out", reference, env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, "checkpoint-4")

    proc = cli("train", *args, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((killed / "report.json").read_text())
    assert report["summary"]["resumed from"].endswith(("checkpoint-4", "checkpoint-6"))
    expected, got = adapter_tensors(reference), adapter_tensors(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-7), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_resume_without_checkpoint_and_reuse_of_a_run_dir_are_findings(tiny_models, text_data, tmp_path):
    proc = cli("train", "--model", tiny_models["31b"], "--data", text_data, "--out", tmp_path / "none", "--resume")
    assert proc.returncode == 1 and "G4T401" in proc.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("old")
    proc = cli("train", "--model", tiny_models["31b"], "--data", text_data, "--out", tmp_path / "used")
    assert proc.returncode == 1 and "G4T004" in proc.stderr


@pytest.mark.slow
def test_packing_run_trains_and_reports_packed_rows(tiny_models, text_data, tmp_path):
    """Failure-catalog row 15: padding-free packing with per-sequence positions trains end to end."""
    out = tmp_path / "packed"
    proc = cli("train", "--model", tiny_models["31b"], "--data", text_data, "--out", out, "--batch-size", 2,
               "--packing", "--max-seq-len", 128, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())["data"]
    assert data["packing"] and data["encoded_examples"] < data["kept"]
    # one epoch: the throughput numerator counts every real token once, none of the batch padding
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["tokens"] == data["tokens"]


@pytest.mark.slow
def test_catalog_name_as_training_model_is_a_finding(text_data, tmp_path):
    proc = cli("train", "--model", "e2b", "--data", text_data, "--out", tmp_path / "r")
    assert proc.returncode == 1 and "G4T001" in proc.stderr and "tiny-model" in proc.stderr
