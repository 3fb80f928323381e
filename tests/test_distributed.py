"""Training on two real processes over gloo (issue 7; failure-catalog rows 23, 25, 27).

The two-process runs go through the CLI, which starts torchrun; each must form one job of world
size 2 (row 27), give the single-process losses on the same global batch (<= 1e-5) and save an
adapter equal to the single-process one, under the keys PEFT loads. DeepSpeed runs are skipped
without DeepSpeed unless ``GEMMA4_TUNE_REQUIRE_ENGINES`` is set, as in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gemma4_tune.config.options import build_config
from gemma4_tune.findings import FindingError
from gemma4_tune.serve import free_port
from gemma4_tune.train.distributed import DistributedPlan, plan_distributed

CLI = [sys.executable, "-m", "gemma4_tune"]
REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED and not REQUIRE, reason="DeepSpeed not installed (make test "
                                     "installs it); set GEMMA4_TUNE_REQUIRE_ENGINES=1 to fail instead")
TOLERANCE = 1e-5
RUN = ["--max-steps", "3", "--eval-split", "0.25", "--seed", "0"]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dist-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model: Path, out: Path, **extra: object) -> object:
    return build_config({"model": str(model), "data": "unused.jsonl", "out": str(out), **extra})


# -- the plan: what gets wrapped, what DDP is told (row 25) ----------------------------------------------


def test_fsdp_wraps_the_text_layer_and_only_towers_that_exist_and_train(tiny_models: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    text = plan_distributed(_config(tiny_models["e2b"], tmp_path, distributed="fsdp2", nproc=2))
    assert text.wrap_classes == ("Gemma4TextDecoderLayer",)
    assert text.find_unused_parameters is False
    towers = plan_distributed(_config(tiny_models["e2b"], tmp_path, distributed="fsdp2", nproc=2,
                                      targets="text,vision,audio"))
    assert towers.wrap_classes == ("Gemma4TextDecoderLayer", "Gemma4VisionEncoderLayer", "Gemma4AudioLayer")
    # tower LoRA gets no gradient from a text-only batch: DDP must look for unused parameters
    assert towers.find_unused_parameters is True
    # the 31B has a vision tower but no audio tower: never wrap a class the model lacks
    dense = plan_distributed(_config(tiny_models["31b"], tmp_path, distributed="fsdp2", nproc=2,
                                     targets="text,vision"))
    assert dense.wrap_classes == ("Gemma4TextDecoderLayer", "Gemma4VisionEncoderLayer")
    fsdp = dense.fsdp_config()
    assert fsdp["version"] == 2 and fsdp["activation_checkpointing"] is True
    assert dense.training_arguments(tmp_path)["activation_checkpointing"] is False  # FSDP checkpoints, not the Trainer


def test_zero3_config_partitions_every_tensor_and_gathers_on_save() -> None:
    plan = DistributedPlan("zero3", 2, ("Gemma4TextDecoderLayer",), False, True, cpu=True, global_batch=2)
    zero = plan.deepspeed_config()["zero_optimization"]
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": 0,
                    "stage3_gather_16bit_weights_on_model_save": True}
    assert plan.environment().get("DS_ACCELERATOR", "cpu") == "cpu"
    assert DistributedPlan("zero2", 2, (), False, True, cpu=True, global_batch=2).deepspeed_config()[
        "zero_optimization"] == {"stage": 2}


def test_dry_run_writes_the_launch_files_and_prints_the_command(tiny_models: dict[str, Path], chat: Path,
                                                                tmp_path: Path) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"model": str(tiny_models["e2b"]), "data": str(chat),
                                        "out": str(tmp_path / "run"), "distributed": "zero3", "nproc": 2,
                                        "batch_size": 2, "grad_accum": 3}))
    proc = subprocess.run([*CLI, "train", str(run_file), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "global batch 12 = batch 2 x grad-accum 3 x 2 processes" in proc.stdout
    assert "torch.distributed.run --nproc-per-node=2 --standalone -m gemma4_tune train" in proc.stdout
    launch = tmp_path / "run" / "launch"
    assert sorted(p.name for p in launch.iterdir()) == ["deepspeed.json", "plan.json", "run.yaml"]
    assert json.loads((launch / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    assert yaml.safe_load((launch / "run.yaml").read_text())["distributed"] == "zero3"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started


def test_distributed_config_outside_a_launcher_is_g4t410(tiny_models: dict[str, Path], chat: Path,
                                                         tmp_path: Path) -> None:
    from gemma4_tune.api import run_training

    cfg = build_config({"model": str(tiny_models["e2b"]), "data": str(chat), "out": str(tmp_path / "r"),
                        "distributed": "ddp"})
    with pytest.raises(FindingError) as exc:
        run_training(cfg)
    assert exc.value.findings[0].code == "G4T410"


def test_saving_an_adapter_with_a_partitioned_tensor_is_g4t411_and_writes_nothing(tiny_models: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model, save_adapter

    model = Gemma4ForConditionalGeneration.from_pretrained(str(tiny_models["e2b"]), dtype=torch.float32)
    peft_model, _ = prepare_model(model, "text", LoraSettings(rank=4))
    state = {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}
    first = next(iter(state))
    state[first] = torch.empty(0)  # what a ZeRO-3 partition looks like outside GatheredParameters
    with pytest.raises(FindingError) as exc:
        save_adapter(peft_model, tmp_path / "adapter", state_dict=state)
    assert exc.value.findings[0].code == "G4T411"
    assert not (tmp_path / "adapter").exists()


# -- row 27: the accelerate bug the patch corrects -----------------------------------------------------

_ROW27_PROBE = textwrap.dedent("""
    import os, sys
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    if sys.argv[1] == "patched":
        from gemma4_tune.model.patches import patch_accelerate_for_cpu_launch
        assert patch_accelerate_for_cpu_launch()
    from accelerate.state import PartialState
    state = PartialState(cpu=False)
    print(state.distributed_type, state.backend)
""")


def test_row27_accelerate_still_loses_the_launch_on_cpu_and_the_patch_restores_it() -> None:
    """If this fails on the unpatched line, accelerate fixed row 27: drop gemma4_tune/model/patches.py's backend patch."""
    assert not torch.cuda.is_available()
    plain = subprocess.run([sys.executable, "-c", _ROW27_PROBE, "plain", str(free_port())], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split()[-2:] == ["DistributedType.NO", "None"]
    patched = subprocess.run([sys.executable, "-c", _ROW27_PROBE, "patched", str(free_port())], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout.split()[-2:] == ["DistributedType.MULTI_CPU", "gloo"]


# -- two real processes against one --------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tiny_models: dict[str, Path], chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process with the global batch (2) that two processes of batch 1 share."""
    out = tmp_path_factory.mktemp("dist") / "single"
    proc = subprocess.run([*CLI, "train", "--model", str(tiny_models["e2b"]), "--data", str(chat), "--out", str(out),
                           "--batch-size", "2", "--samples", "0", *RUN], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _metrics(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return [r[key] for r in rows if key in r]


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize(("strategy", "formed"), [
    ("ddp", "MULTI_CPU"),
    ("fsdp2", "FSDP"),
    pytest.param("zero2", "DEEPSPEED", marks=needs_deepspeed),
    pytest.param("zero3", "DEEPSPEED", marks=needs_deepspeed),
])
def test_two_processes_match_one_and_save_the_same_adapter(strategy: str, formed: str, single: Path,
                                                           tiny_models: dict[str, Path], chat: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / strategy
    samples = ["--samples", "1"] if strategy in ("fsdp2", "zero3") else ["--samples", "0"]
    proc = subprocess.run([*CLI, "train", "--model", str(tiny_models["e2b"]), "--data", str(chat), "--out", str(out),
                           "--batch-size", "1", "--distributed", strategy, "--nproc", "2", *samples, *RUN],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    # row 27: one job of two processes of the requested kind, not two separate jobs
    job = json.loads((out / "run.json").read_text())["distributed"]
    assert job == {"strategy": strategy, "world_size": 2, "expected_world_size": 2, "distributed_type": formed}
    ours, theirs = _metrics(out, "loss"), _metrics(single, "loss")
    assert len(ours) == len(theirs) == 3
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(_metrics(out, "eval_loss"), _metrics(single, "eval_loss"),
                                          strict=True)) <= TOLERANCE
    # row 23: every tensor saved whole, under the keys a single-process run writes (the ones PEFT loads)
    got, want = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (out, single))
    assert got.keys() == want.keys()
    assert all(got[k].shape == want[k].shape and got[k].numel() > 0 for k in want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= TOLERANCE
    report = json.loads((out / "report.json").read_text())
    check = report["verification"]["saved_tensors" if strategy in ("fsdp2", "zero3") else "peft_reload"]
    assert check["ok"] is True
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    if strategy in ("fsdp2", "zero3"):  # generation in lockstep across the shards
        assert report["samples"][0]["tuned"]
