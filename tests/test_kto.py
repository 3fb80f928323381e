"""Preference tuning with KTO (``train --method kto``, issue 21 item 7) on tiny E2B (image pairs) and tiny 31B.

The same pairs as tests/test_dpo.py (whose SIGKILL-resume test runs KTO too), unpaired (chosen: desirable,
rejected: undesirable), on TRL's KTOTrainer with DPO's model preparation, answer mask, reference (the base with
the adapter disabled) and preflight.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from safetensors.torch import load_file

from gemma4_tune.config.options import RunConfig
from tests.test_dpo import cli, dpo_args, write_pairs


def kto_args(model, data, targets: str = "text,vision") -> list:
    args = dpo_args(model, data, targets)
    args[args.index("--method") + 1] = "kto"
    return args


def test_kto_rows_alternate_labels_and_neighbours_have_other_prompts(tmp_path) -> None:
    from gemma4_tune.train.methods.kto import METHOD as kto
    from gemma4_tune.train.methods.kto import kto_dataset

    train, held = write_pairs(tmp_path / "data", images=True, n=4, n_eval=2)
    rows = kto_dataset(kto.read_data(RunConfig(model="m", data=str(train), eval_data=str(held), method="kto",
                                               batch_size=2)).pairs)
    assert len(rows) == 8 and rows["label"] == [True, False] * 4
    assert rows[0]["completion"][0]["content"][0]["text"].startswith("Thank you")
    assert rows[1]["completion"][0]["content"][0]["text"] == "No."
    assert rows[0]["prompt"] != rows[1]["prompt"] and rows[1]["prompt"] == rows[2]["prompt"]
    assert [len(m) for m in rows["images"]] == [1, 0, 0, 1, 1, 0, 0, 1]
    assert RunConfig(model="m", data="d.jsonl", method="kto", beta=0.2).dump()["beta"] == 0.2


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "images", "targets"), [("e2b", True, "text,vision"), ("31b", False, "text")])
def test_kto_raises_the_held_out_reward_margin_with_the_base_as_reference(tiny_models, tmp_path, variant, images,
                                                                          targets):
    data = write_pairs(tmp_path / "data", images=images)
    out = tmp_path / "run"
    proc = cli("train", *kto_args(tiny_models[variant], data, targets), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    evals = report["kto"]["evals"]
    first, last = evals[0], evals[-1]
    print(json.dumps({"variant": variant, "before": first, "after": last}))
    assert [e["step"] for e in evals] == [0, 3, 6]  # before, every --eval-steps, at the end
    assert first["eval_reward_margin"] == 0.0 == first["eval_reward_chosen"]  # the reference is the base
    assert last["eval_reward_margin"] > first["eval_reward_margin"]
    assert "G4T515" not in [f["code"] for f in report["findings"]]
    pf = report["kto"]["preflight"]
    assert pf["max_abs_log_ratio_step0"] == 0.0 and pf["reference_equals_base"] and pf["policy_minus_base"] > 0.1
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == []
    assert report["summary"]["method"] == "kto" and json.loads((out / "run.json").read_text())["method"] == "kto"
    steps = [m for m in report["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7)) and all("rewards/margins" in m and "kl" in m for m in steps)
    assert (out / "kto.png").is_file() and "Preference tuning (KTO)" in (out / "report.md").read_text()
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys and not [k for k in keys if ".ref." in k], "TRL's reference copy of the adapter is not saved"
    if variant == "31b":  # compare shows it with its method and its held-out margin
        (tmp_path / "again").symlink_to(out)
        proc = cli("compare", out, tmp_path / "again", "--out", tmp_path / "cmp", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs = json.loads(proc.stdout)["runs"]
        assert runs[0]["method"] == "kto" and runs[0]["eval_reward_margin_start"] == 0.0
        assert runs[0]["eval_reward_accuracy_start"] is None and runs[0]["settings"]["beta"] == 0.1


@pytest.mark.slow
def test_kto_reference_is_the_base_and_one_that_keeps_the_adapter_on_is_g4t512(tiny_models, tmp_path, monkeypatch):
    from trl.trainer import kto_trainer

    from gemma4_tune.train.methods.kto import METHOD as kto
    from gemma4_tune.train.preference import dpo_preflight, preflight_pairs, probe_batch

    train, held = write_pairs(tmp_path / "data", images=True, n=4, n_eval=2)
    cfg = RunConfig(model=str(tiny_models["31b"]), data=str(train), eval_data=str(held), out=str(tmp_path / "run"),
                    method="kto", targets="text,vision", rank=8, batch_size=2)
    data = kto.read_data(cfg)
    built = kto.build_trainer(cfg, data, tmp_path / "staging")
    model = built["model"]
    assert list(model.peft_config) == ["default"], "no second adapter: the reference is the adapter disabled"
    batch = probe_batch(built["trainer"])
    assert batch["label"].tolist() == [True, False] and "KL_completion_mask" in batch
    assert "pixel_values" in batch and "mm_token_type_ids" in batch
    eot = built["processor"].tokenizer.convert_tokens_to_ids("<turn|>")
    for prefix in ("", "KL_"):  # SFT's rule: each answer ends with its end-of-turn token, on the KL rows too
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
        for row in range(ids.shape[0]):
            supervised = ids[row][mask[row].bool()].tolist()
            assert supervised and supervised[-1] == eot, (prefix, row)
    result = preflight_pairs(built, batch, data.summary)  # SFT's preflight on the KTO batch, then the reference checks
    assert result.findings == [] and result.loss > 0 and set(result.lora_grad) == {"text", "vision"}
    assert result.reference["reference_equals_base"] and result.reference["max_abs_log_ratio_step0"] == 0.0
    monkeypatch.setattr(kto_trainer, "use_adapter", lambda model, adapter_name: contextlib.nullcontext())
    findings, figures = dpo_preflight(model, built["profile"], batch)
    assert [f.code for f in findings] == ["G4T512"] and "KTO reference" in findings[0].message
    assert figures["reference_minus_base"] == figures["policy_minus_base"] > 0.1


@pytest.mark.slow
def test_preflight_method_kto_writes_nothing(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "data", images=False, n=4, n_eval=2)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = cli("preflight", *kto_args(tiny_models["e2b"], data, "text"), "--json")  # KTO's text path
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["reference"]["reference_equals_base"] and result["reference"]["completions_in_batch"] == 2
    assert [f["code"] for f in result["findings"] if f["severity"] == "error"] == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_kto_that_learns_nothing_is_g4t515(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "data", images=False, n=4, n_eval=2)
    args = kto_args(tiny_models["31b"], data, targets="text")
    args[args.index("--lr") + 1] = 1e-12
    args[args.index("--max-steps") + 1] = 2
    proc = cli("train", *args, "--out", tmp_path / "run", "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "G4T515"]
    assert found and found[0]["message"].startswith("held-out reward margin 0.000 -> "), found
