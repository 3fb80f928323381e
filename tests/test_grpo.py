"""GRPO (``train --method grpo``, issue 33) on TRL 1.16's GRPOTrainer with our rendering, on tiny E2B and tiny 31B.

Fast tests read prompts, load rewards and read completions with the tiny model's real tokenizer; slow ones train.
The traps of TRL used plainly (padding inside the prompt mask, ``mm_token_type_ids`` one longer than the ids and
shifted, the thought channel handed to the reward) are measured side by side in ``bench/grpo_traps.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma4_tune.config.options import RunConfig
from gemma4_tune.findings import FindingError
from tests.test_dpo import cli

LETTER_E = '''
def letter_e(prompts, completions, **kwargs):
    """Share of the answer's characters that are "e": partial credit, so completions differ within a group."""
    return [c[0]["content"].count("e") / max(len(c[0]["content"]), 1) for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def one_value(prompts, completions, **kwargs):
    return [1.0]


def seen(prompts, completions, completion_ids, answer, **kwargs):
    """What a reward is handed, written beside this file (the test reads it)."""
    import json
    import pathlib

    path = pathlib.Path(__file__).with_name("seen.jsonl")
    with path.open("a") as handle:
        handle.write(json.dumps({"completions": completions, "answer": answer}) + "\\n")
    return [0.0] * len(completions)
'''


def module_reward(prompts, completions, **kwargs):
    """A reward found as ``module:FUNC``."""
    return [0.5] * len(completions)


def write_prompts(folder: Path, *, images: bool = False, n: int = 8, offset: int = 0) -> Path:
    """Prompts as TRL's conversational prompt-only rows with an ``answer`` column; every other one with an image."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(offset)
    rows = []
    for i in range(n):
        content = [{"type": "text", "text": f"Say something about the number {i + offset}" + "!" * (i % 3)}]
        if images and i % 2 == 0:
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i + offset}.png")
            content.insert(0, {"type": "image", "path": f"{i + offset}.png"})
        rows.append({"prompt": [{"role": "user", "content": content}], "answer": str(i + offset)})
    path = folder / f"prompts{offset}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rewards_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rewards.py").write_text(LETTER_E)
    return folder / "rewards.py"


def grpo_args(model: Path, data: Path, reward: str, *extra: object) -> list:
    return ["--method", "grpo", "--model", model, "--data", data, "--reward", reward, "--batch-size", 4,
            "--num-generations", 4, "--max-completion-length", 8, "--rank", 8, "--seed", 1, "--samples", 2, *extra]


# --------------------------------------------------------------------------- fast: data, rewards, completions


def test_prompts_read_strings_conversations_and_hand_every_other_column_to_the_rewards(tmp_path) -> None:
    from gemma4_tune.data.prompts import load_prompts
    from gemma4_tune.data.records import DataSource

    rows = [{"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
            {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red"}]},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What?"}],
             "images": ["x.png"], "answer": "a square"}]
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, reports, findings = load_prompts([DataSource(str(tmp_path / "p.jsonl"))])
    assert findings == [] and len(prompts) == 3
    assert prompts[0].messages == [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]
    assert prompts[0].columns == {"answer": "4", "level": 1}
    assert prompts[1].columns == {"answer": "Red"} and [m["role"] for m in prompts[1].messages] == ["user"]
    assert prompts[2].images == [str(tmp_path / "x.png")] and prompts[2].columns == {"answer": "a square"}
    assert reports[0].answers_from_conversation == 1
    assert "answer (3), level (1)" in reports[0].summary()

    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "no prompt"}) + "\n" + json.dumps(
        {"prompt": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}]}) + "\n")
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(FindingError) as err:
        load_prompts([DataSource(str(tmp_path / "bad.jsonl"))])
    assert {f.code for f in err.value.findings} == {"G4T330", "G4T331"}


def test_builtin_and_user_rewards_load_and_score_with_trl_signature(tmp_path) -> None:
    from gemma4_tune.train.rewards import REWARD_NOT_FOUND, builtin, check_reward_specs, load_user_reward

    answers = [[{"role": "assistant", "content": a}] for a in ("4", " 4 ", "The answer is 1,004.0", "four")]
    assert builtin("exact", 0)(answers, answer=["4"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert builtin("numeric:gold", 0)(answers, gold=[4, "4", "1004", "4"]) == [1.0, 1.0, 1.0, 0.0]
    assert builtin(r"regex:\d+", 0)(answers) == [1.0, 1.0, 0.0, 0.0]
    assert builtin("ends_turn", 106)(answers, completion_ids=[[5, 106], [5], [106], []]) == [1.0, 0.0, 1.0, 0.0]
    path = rewards_file(tmp_path)
    assert load_user_reward(f"{path}:letter_e")(None, [[{"content": "ee"}]]) == [1.0]
    assert load_user_reward("tests.test_grpo:module_reward")(None, [[{"content": "a"}]]) == [0.5]
    for spec in (f"{path}:nothing", f"{tmp_path}/missing.py:f", "no_such_module_xyz:f", "os.path:join", "regex:(",
                 "exactly", "bleu:x"):
        with pytest.raises(FindingError) as err:
            check_reward_specs([spec])
        assert err.value.findings[0].code == REWARD_NOT_FOUND.code, spec


def test_reward_output_must_be_one_finite_number_per_completion() -> None:
    from gemma4_tune.train.rewards import REWARD_BAD_OUTPUT, check_rewards

    assert check_rewards("r", [1, None, 0.5], 3) == [1.0, None, 0.5]
    for values in ([1.0], [1.0, float("nan"), 0.0], [1.0, "x", 0.0], 3.0, [True, 1.0, 1.0]):
        with pytest.raises(FindingError) as err:
            check_rewards("r", values, 3)
        assert err.value.findings[0].code == REWARD_BAD_OUTPUT.code


def test_rewards_see_the_answer_without_the_thought_channel_where_trl_runs_them_together(tiny_models) -> None:
    """TRL decodes completions with skip_special_tokens: the thought and the answer reach the reward as one string."""
    from transformers import AutoTokenizer

    from gemma4_tune.train.grpo import thought_leaks
    from gemma4_tune.train.rewards import read_completion

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["e2b"])
    text = "<|channel>thought\nlet me think<channel|>The answer is 7<turn|>\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert plain.startswith("thought") and "let me think" in plain and "The answer is 7" in plain  # TRL's
    read = read_completion(tokenizer, ids)
    assert (read.answer, read.reasoning, read.ended) == ("The answer is 7", "let me think", True)
    assert read.message() == {"role": "assistant", "content": "The answer is 7", "reasoning_content": "let me think"}
    unclosed = read_completion(tokenizer, tokenizer("The answer<channel|> is 7", add_special_tokens=False)["input_ids"])
    assert not unclosed.ended
    findings = thought_leaks([read, unclosed])
    assert [f.code for f in findings] == ["G4T524"] and findings[0].details["count"] == 1


def test_grpo_settings_are_checked_before_anything_loads() -> None:
    for bad in ({"num_generations": 3}, {"method": "grpo"}, {"method": "grpo", "rewards": ["exact"], "batch_size": 3},
                {"method": "grpo", "rewards": ["exact", "ends_turn"], "reward_weights": "1"},
                {"method": "dpo", "beta": 0}):
        with pytest.raises(ValueError):
            RunConfig(model="m", data="d.jsonl", **bad)
    cfg = RunConfig(model="m", data="d.jsonl", method="grpo", rewards="exact", batch_size=4, beta=0)
    assert cfg.dump()["rewards"] == ["exact"] and "num_generations" not in RunConfig(model="m", data="d").dump()


# --------------------------------------------------------------------------- slow: training


@pytest.mark.slow
def test_tiny_e2b_learns_a_verifiable_reward(tiny_models, tmp_path) -> None:
    """Held-out reward (greedy) of the tuned model above the base's; every step logged; report and plot written."""
    data, held = write_prompts(tmp_path / "data"), write_prompts(tmp_path / "data", n=6, offset=100)
    reward = f"{rewards_file(tmp_path / 'r')}:letter_e"
    out = tmp_path / "run"
    proc = cli("train", *grpo_args(tiny_models["e2b"], data, reward, "--eval-data", held, "--max-steps", 8,
                                   "--lr", 1e-2), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    evals = report["grpo"]["evals"]
    print(json.dumps({"evals": evals, "rewards": [m["reward"] for m in report["metrics"] if "loss" in m]}))
    assert evals["where"] == "held-out" and evals["prompts"] == 6
    assert evals["tuned"]["eval_reward"] > evals["base"]["eval_reward"]
    steps = [m for m in report["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9)) and all(m["tokens_per_s"] > 0 for m in steps)
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # the reference is the base: 0 until the adapter moves
    pf = report["grpo"]["preflight"]
    assert pf["pad_tokens_inside_prompt_mask"] == 0 and pf["reference_equals_base"] and pf["policy_moves"]
    assert pf["thinking_switches_per_prompt"] == [0]
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == []
    assert (out / "grpo.png").is_file() and "GRPO" in (out / "report.md").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len(report["samples"]) == 2 and report["samples"][0]["held_out"]


@pytest.mark.slow
def test_tiny_31b_image_prompts_train_unpadded_with_aligned_token_types(tiny_models, tmp_path) -> None:
    """Mixed image and text prompts on the bidirectional-image 31B: no pad inside a prompt mask, mm_token_type_ids
    of every forward mark exactly its image tokens, finite loss and gradient at every step."""
    import math

    data = write_prompts(tmp_path / "data", images=True)
    reward = f"{rewards_file(tmp_path / 'r')}:letter_e"
    out = tmp_path / "run"
    proc = cli("train", *grpo_args(tiny_models["31b"], data, reward, "--max-steps", 2, "--targets", "text,vision",
                                   "--lr", 5e-3), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    pf = report["grpo"]["preflight"]
    assert pf["completions"] == 8 and pf["pad_tokens_inside_prompt_mask"] == 0
    # the generation's prefill and the reference's chunk with images (the text chunk has none)
    assert pf["forwards_with_images"] == 2 and pf["forwards_with_misaligned_mm_token_type_ids"] == 0
    assert report["preflight"]["lora_grad"]["vision"] > 0
    steps = [m for m in report["metrics"] if "loss" in m]
    assert len(steps) == 2 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in steps)
    assert any(m["grad_norm"] > 0 for m in steps)


@pytest.mark.slow
def test_constant_rewards_warn_at_preflight_and_stop_training(tiny_models, tmp_path) -> None:
    data = write_prompts(tmp_path / "data")
    out = tmp_path / "run"
    proc = cli("train", *grpo_args(tiny_models["e2b"], data, f"{rewards_file(tmp_path / 'r')}:constant",
                                   "--max-steps", 6), "--out", out)
    assert proc.returncode == 1
    report = json.loads((out / "report.json").read_text())
    codes = [f["code"] for f in report["findings"]]
    assert "G4T522" in codes and "G4T421" in codes  # the specific finding, before the generic ones
    assert "G4T404" not in codes and "G4T405" not in codes
    steps = [m for m in report["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and all(m["frac_reward_zero_std"] == 1 for m in steps)
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_wrong_count_clipped_completions_and_thinking_once_at_preflight(tiny_models, tmp_path) -> None:
    data = write_prompts(tmp_path / "data")
    path = rewards_file(tmp_path / "r")
    proc = cli("preflight", *grpo_args(tiny_models["e2b"], data, f"{path}:one_value"))
    assert proc.returncode == 1 and "G4T517" in proc.stdout + proc.stderr and "one_value" in proc.stdout + proc.stderr
    proc = cli("preflight", *grpo_args(tiny_models["e2b"], data, f"{path}:seen", "--max-completion-length", 2),
               "--thinking", "--json")
    result = json.loads(proc.stdout)
    codes = [f["code"] for f in result["findings"]]
    assert result["reference"]["thinking_switches_per_prompt"] == [1] and "G4T525" not in codes  # rendered once
    assert "G4T523" in codes and result["reference"]["ended_turn_share"] == 0.0  # every completion cut at 2 tokens
    seen = [json.loads(line) for line in (path.parent / "seen.jsonl").read_text().splitlines()]
    assert seen[0]["answer"][:4] == ["0"] * 4  # the data's columns, one per completion of the group
    assert all(set(c[0]) <= {"role", "content", "reasoning_content"} for c in seen[0]["completions"])


def test_axolotl_rl_grpo_maps_its_trl_block(tmp_path) -> None:
    from gemma4_tune.config import read_run_file

    (tmp_path / "run.yaml").write_text(
        "base_model: /models/gemma-4-e2b\nrl: grpo\ndatasets:\n  - path: prompts.jsonl\nmicro_batch_size: 4\n"
        "adapter: lora\nlora_r: 8\noutput_dir: out\ntrl:\n  beta: 0.04\n  num_generations: 4\n"
        "  max_completion_length: 64\n  reward_funcs: [rewards.letter_e]\n  reward_weights: [1.0]\n"
        "  use_vllm: true\n  vllm_mode: server\n")
    imported = read_run_file(tmp_path / "run.yaml", {})
    (tmp_path / "bad.yaml").write_text((tmp_path / "run.yaml").read_text() + "  epsilon_high: 0.28\n")
    with pytest.raises(FindingError, match="trl.epsilon_high"):
        read_run_file(tmp_path / "bad.yaml", {})
    rows = {row["key"]: row for row in imported.mapping}
    cfg = imported.config
    assert (cfg.method, cfg.rewards, cfg.beta, cfg.num_generations, cfg.max_completion_length) == (
        "grpo", ["rewards:letter_e"], 0.04, 4, 64)
    assert rows["trl.use_vllm"]["status"] == rows["trl.vllm_mode"]["status"] == "no effect"
    assert rows["trl.reward_funcs"]["status"] == "mapped"


def test_rollouts_go_to_colocated_vllm_on_cuda_and_to_transformers_here(tmp_path) -> None:
    """The CUDA branch cannot run here: its settings are built and TRL's GRPOConfig accepts them (a dry run)."""
    from trl import GRPOConfig

    from gemma4_tune.train.grpo import generation_settings

    cuda = generation_settings(cuda=True, vllm=True)
    assert cuda["use_vllm"] and cuda["vllm_mode"] == "colocate"
    assert generation_settings(cuda=True, vllm=False) == generation_settings(cuda=False, vllm=True) == {
        "use_vllm": False}
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, num_generations=4, per_device_train_batch_size=4, **cuda)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.vllm_enable_sleep_mode


def _preflight_with(trainer_class: type, model: Path, data: Path, monkeypatch, **settings):
    """``preflight --method grpo`` in this process with the trainer class swapped: TRL's own steps put back where
    gemma4-tune replaces them, to prove the checks see what TRL used plainly does."""
    from gemma4_tune.train import grpo
    from gemma4_tune.train.methods.grpo import METHOD

    monkeypatch.setattr(grpo, "Gemma4GRPOTrainer", trainer_class)
    cfg = RunConfig(model=str(model), data=str(data), method="grpo", rewards=["ends_turn"], batch_size=4,
                    max_completion_length=4, rank=8, **settings)
    return METHOD.preflight_only(cfg)


@pytest.mark.slow
def test_trls_padded_prompts_are_g4t520(tiny_models, tmp_path, monkeypatch) -> None:
    """TRL renders the batch through the processor, which pads: pad ids inside an all-ones prompt mask."""
    from trl import GRPOTrainer

    from gemma4_tune.train.grpo import Gemma4GRPOTrainer

    class PlainPrompts(Gemma4GRPOTrainer):
        _tokenize_prompts = GRPOTrainer._tokenize_prompts

    data = write_prompts(tmp_path / "data", n=4)
    result = _preflight_with(PlainPrompts, tiny_models["e2b"], data, monkeypatch)
    assert "G4T520" in [f.code for f in result.findings]
    assert result.reference["pad_tokens_inside_prompt_mask"] > 0  # ours: 0 (the E2B and 31B training tests)


@pytest.mark.slow
def test_trls_shifted_token_types_are_g4t521(tiny_models, tmp_path, monkeypatch) -> None:
    """TRL's log-prob forwards take mm_token_type_ids from re-tokenised text with a second <bos>: one longer than
    the ids, the image block one position late, on the bidirectional 31B."""
    from trl import GRPOTrainer

    from gemma4_tune.train.grpo import Gemma4GRPOTrainer

    class PlainTypes(Gemma4GRPOTrainer):
        _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies

    folder = tmp_path / "data"
    data = write_prompts(folder, images=True, n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if len(r["prompt"][0]["content"]) == 2) * 2)
    result = _preflight_with(PlainTypes, tiny_models["31b"], data, monkeypatch)
    assert "G4T521" in [f.code for f in result.findings]
    assert result.reference["forwards_with_misaligned_mm_token_type_ids"] >= 1


@pytest.mark.slow
def test_a_thinking_switch_in_the_data_is_g4t525(tiny_models, tmp_path) -> None:
    rows = [{"prompt": f"Think first <|think|> then answer {i}", "answer": str(i)} for i in range(2)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("preflight", *grpo_args(tiny_models["e2b"], tmp_path / "p.jsonl", "ends_turn"), "--json")
    result = json.loads(proc.stdout)
    assert "G4T525" in [f["code"] for f in result["findings"]] and proc.returncode == 1
    assert result["reference"]["thinking_switches_per_prompt"] == [1]


@pytest.mark.slow
def test_trls_reference_adapter_copy_is_g4t526(tiny_models, tmp_path, monkeypatch) -> None:
    """Handed a PeftModel whose adapter is not fresh, TRL copies it into a `ref` adapter: the KL then pulls towards
    that adapter, not the base. gemma4-tune deletes it; kept, the reference probe names it."""
    import torch

    from gemma4_tune.plan import adapters
    from gemma4_tune.train.grpo import Gemma4GRPOTrainer

    prepare = adapters.prepare_model

    def trained_start(*args, **kwargs):
        model, plan = prepare(*args, **kwargs)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        return model, plan

    class KeepsRef(Gemma4GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model.delete_adapter = lambda name: None  # TRL's `ref` copy stays

    monkeypatch.setattr(adapters, "prepare_model", trained_start)
    result = _preflight_with(KeepsRef, tiny_models["e2b"], write_prompts(tmp_path / "data", n=2), monkeypatch)
    assert "G4T526" in [f.code for f in result.findings] and not result.reference["reference_equals_base"]


def test_no_prompt_left_is_g4t332(tmp_path) -> None:
    from gemma4_tune.data.prompts import load_prompts
    from gemma4_tune.data.records import DataSource

    (tmp_path / "p.jsonl").write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(FindingError) as err:
        load_prompts([DataSource(str(tmp_path / "p.jsonl"))], skip_invalid=True)
    assert [f.code for f in err.value.findings] == ["G4T332"]


def test_reward_codes_are_named(tmp_path) -> None:
    from gemma4_tune.train.rewards import check_reward_specs, check_rewards

    with pytest.raises(FindingError) as err:
        check_reward_specs([f"{tmp_path}/missing.py:f"])
    assert err.value.findings[0].code == "G4T516"
    with pytest.raises(FindingError) as err:
        check_rewards("r", [1.0], 2)
    assert err.value.findings[0].code == "G4T517"


@pytest.mark.slow
def test_grpo_sigkill_then_resume_ends_with_the_uninterrupted_adapter(tiny_models, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from tests.test_train import SAME_THREADS, kill_at_checkpoint

    data = write_prompts(tmp_path / "data", n=6)
    args = grpo_args(tiny_models["e2b"], data, f"{rewards_file(tmp_path / 'r')}:letter_e", "--max-steps", 4,
                     "--save-steps", 2, "--lr", 5e-3)
    reference = tmp_path / "reference"
    proc = cli("train", *args, "--out", reference, env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_at_checkpoint(args, killed, "checkpoint-2")
    other = list(args)
    other[other.index("--num-generations") + 1] = 2
    proc = cli("train", *other, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode != 0 and "G4T414" in proc.stdout + proc.stderr and "num_generations: 4 -> 2" in (
        proc.stdout + proc.stderr)
    proc = cli("train", *args, "--out", killed, "--resume", env=SAME_THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_trl_fused_head_scores_only_labelled_positions_on_the_cpu_once_patched(tiny_models, monkeypatch) -> None:
    """Issue 33 item 6: TRL 1.16's fused LM head projects every position on the CPU (this test fails once a release
    no longer does: drop the patch); patched, it projects the labelled ones only, with the same log-probabilities."""
    import torch
    from transformers import AutoModelForImageTextToText
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer import utils

    from gemma4_tune.model.patches import patch_trl_compact_log_probs, trl_scores_every_position

    assert trl_scores_every_position() and not _use_triton(torch.device("cpu"))  # upstream: wide on the CPU
    monkeypatch.setattr(utils, "_use_triton", _use_triton)  # upstream's choice, though a run in this process patched it
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["e2b"], dtype=torch.float32).eval()
    utils.add_fused_lm_head(model)
    ids = torch.randint(20, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :20] = -100  # the answers: 4 positions per row
    rows: list[int] = []
    apply = utils._ChunkedLogProbFunction.apply

    def counted(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", counted)
    with torch.no_grad():
        wide = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        assert patch_trl_compact_log_probs() and patch_trl_compact_log_probs()  # idempotent
        compact = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert rows == [46, 8]  # every predicting position (2 x 23), then the 2 x 4 that predict a labelled token
    assert torch.allclose(wide, compact, atol=1e-5) and bool((compact[:, -4:] != 0).all())
