"""Issue 34: video verified per modality: stock PEFT and the merged checkpoint in transformers compare a video row
for an adapter trained on video; an engine that does not run Gemma 4 video says so in a row naming video.

The adapter is trained for real (2 steps on LLaMA-Factory's video demo rows, text + vision LoRA) and its manifest
records the data's modalities, which is what makes verify add the video prompt.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_tune.engines import llamacpp_env
from gemma4_tune.engines import vllm_env as engine_env

LF = Path(__file__).parent / "data" / "llamafactory" / "data"
CLI = [sys.executable, "-c", "from gemma4_tune.cli import main; main()"]
VIDEO_TYPE = 2  # mm_token_type_ids of video soft tokens


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def video_run(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """E2B trained 2 steps on the video demo rows (text + vision LoRA) and its merged checkpoint."""
    root = tmp_path_factory.mktemp("verify-video")
    proc = cli("train", "--model", tiny_models["e2b"], "--data", LF / "mllm_video_demo.json", "--out", root / "run",
               "--targets", "text,vision", "--max-steps", 2, "--batch-size", 2, "--lr", 1e-2, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = root / "run" / "adapter"
    proc = cli("export", "--base", tiny_models["e2b"], "--adapter", adapter, "--merged", root / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": tiny_models["e2b"], "adapter": adapter, "merged": root / "merged", "root": root}


def test_video_prompt_only_for_an_adapter_trained_on_video(tiny_models, tmp_path):
    from transformers import AutoProcessor

    from gemma4_tune.export.manifest import write_manifest
    from gemma4_tune.verify.prompts import VIDEO_FRAMES, processed, verification_prompts

    base = tiny_models["e2b"]
    processor = AutoProcessor.from_pretrained(str(base))
    for name, recorded in (("stock", None), ("images", {"text": 2, "image": 3, "video": 0}),
                           ("video", {"text": 0, "video": 2})):
        (tmp_path / name).mkdir()
        if recorded is not None:
            write_manifest(tmp_path / name, base, training={}, versions={}, data_modalities=recorded)
    assert [p.modality for p in verification_prompts(base, processor)] == ["text"] * 3 + ["image"] * 2 + ["audio"] * 2
    for name in ("stock", "images"):  # no record, or no video in it: the lists stay as they were
        assert "video" not in {p.modality for p in verification_prompts(base, processor, tmp_path / name)}
    (video,) = [p for p in verification_prompts(base, processor, tmp_path / "video") if p.modality == "video"]
    batch = processed(processor, [video])
    assert batch["num_frames_per_video"].tolist() == [VIDEO_FRAMES]
    assert batch["pixel_values_videos"].shape[0] == VIDEO_FRAMES
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert all(f"00:0{i}" in text for i in range(VIDEO_FRAMES))  # one timestamp per frame, from the metadata's fps
    assert int((batch["mm_token_type_ids"] == VIDEO_TYPE).sum()) == int((batch["input_ids"] ==
                                                                         processor.video_token_id).sum()) > 0


@pytest.mark.slow
def test_video_rows_pass_in_peft_and_transformers(video_run, tmp_path):
    manifest = json.loads((video_run["adapter"] / "gemma4_tune_manifest.json").read_text())
    assert manifest["data_modalities"]["video"] == 3 and manifest["data_modalities"]["image"] == 0
    proc = cli("verify", "--base", video_run["base"], "--adapter", video_run["adapter"], "--merged",
               video_run["merged"], "--engine", "peft,transformers", "--out", tmp_path / "v", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [(e["engine"], e["modalities"]) for e in result["engines"]] == [
        (engine, [m]) for engine in ("peft", "transformers") for m in ("text", "image", "audio", "video")]
    video = [e for e in result["engines"] if e["modalities"] == ["video"]]
    for row in video:  # one video of 3 frames, every position compared, the adapter moves it
        assert row["verdict"] == "pass" and row["prompts"] == 1 and row["positions"] > 3 * 60
        assert row["max_logit_diff"] <= row["tolerance"] == 5e-4 < row["adapter_effect"]
    assert "| peft | video | 1 prompts," in (tmp_path / "v" / "verify.md").read_text()


@pytest.mark.slow
def test_merged_checkpoint_without_its_vision_deltas_fails_the_video_row(video_run, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(video_run["merged"], merged)
    base = load_file(str(video_run["base"] / "model.safetensors"))
    weights = merged / "model.safetensors"
    tensors = load_file(str(weights))
    reverted = {k: base[k] if ".vision_tower." in k and k in base else v for k, v in tensors.items()}
    assert any(not torch.equal(reverted[k], tensors[k]) for k in tensors), "the merge holds no vision delta"
    save_file(reverted, str(weights), metadata={"format": "pt"})
    proc = cli("verify", "--base", video_run["base"], "--adapter", video_run["adapter"], "--merged", merged,
               "--engine", "transformers", "--out", tmp_path / "v", "--json")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {e["modalities"][0]: e for e in json.loads(proc.stdout)["engines"]}
    assert rows["text"]["verdict"] == "pass" and rows["audio"]["verdict"] == "pass"
    assert rows["video"]["verdict"] == "FAIL" and [f["code"] for f in rows["video"]["findings"]] == ["G4T610"]
    assert rows["video"]["positions"] > 0 and rows["video"]["max_logit_diff"] > rows["video"]["tolerance"]


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(llamacpp_env.llamacpp_install() is None, reason="llama.cpp not installed")
def test_llamacpp_names_video_as_not_run(video_run):
    from gemma4_tune.export.gguf import export_gguf
    from gemma4_tune.verify.llamacpp import engine_results

    out = export_gguf(video_run["merged"], video_run["root"] / "gguf", "f32", base_dir=video_run["base"])["out_dir"]
    rows = engine_results(video_run["base"], video_run["adapter"], out, log=lambda _line: None)
    (row,) = [r for r in rows if r.modalities == ["video"]]
    assert row.verdict == "not run" and row.prompts == 0 and row.ok
    assert [f.code for f in row.findings] == ["G4T920"] and "video" in row.findings[0].message


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(engine_env.vllm_python() is None, reason="vLLM environment not installed")
def test_vllm_merged_checkpoint_on_the_video_prompt(video_run):
    from gemma4_tune.verify.vllm_modalities import vllm_merged_parity

    out = vllm_merged_parity(video_run["base"], video_run["adapter"], video_run["merged"], log=lambda _line: None)
    assert set(out) == {"text", "image", "audio", "video"}
    video = out["video"]
    assert video.prompts == 1 and video.positions > 3 * 60 and not video.findings, video.findings
