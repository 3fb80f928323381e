"""Run configuration: flags and YAML map 1:1; mistakes are findings with a did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma4_tune.config import build_config, load_yaml
from gemma4_tune.findings import FindingError

BASE = {"model": "m", "data": "d.jsonl", "out": "o"}


def test_yaml_keys_map_to_the_flags_and_flags_override(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("model: m\ndata: d.jsonl\nout: o\nmax_steps: 5\nlr: 0.001\ntargets: [text, vision]\n")
    cfg = load_yaml(run, {"max_steps": 7})
    assert cfg.max_steps == 7 and cfg.lr == 0.001 and cfg.targets == "text,vision"


def test_axolotl_keys_are_accepted(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("base_model: m\ndatasets:\n  - path: d.jsonl\noutput_dir: o\nlora_r: 8\nlora_alpha: 16\n"
                   "micro_batch_size: 2\ngradient_accumulation_steps: 4\nlearning_rate: 0.0001\nadapter: lora\n")
    cfg = load_yaml(run)
    assert (cfg.model, cfg.data[0].path, cfg.rank, cfg.alpha, cfg.batch_size, cfg.grad_accum) == ("m", "d.jsonl", 8, 16, 2, 4)


def test_unknown_key_is_refused_with_did_you_mean(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("model: m\ndata: d\nout: o\nmax_step: 5\n")
    with pytest.raises(FindingError) as info:
        load_yaml(run)
    (f,) = info.value.findings
    assert f.code == "G4T005" and "'max_step' (did you mean 'max_steps'?)" in f.message


@pytest.mark.parametrize(("values", "field"), [({"rank": 0}, "rank"), ({"train_on": "everything"}, "train_on"),
                                               ({"lr": -1}, "lr")])
def test_bad_values_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(FindingError) as info:
        build_config({**BASE, **values})
    assert field in info.value.findings[0].message


def test_missing_required_and_broken_yaml(tmp_path: Path) -> None:
    with pytest.raises(FindingError) as info:
        build_config({"model": "m"})
    assert {"data"} <= {f.message.split(": ")[1] for f in info.value.findings}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(FindingError, match="not valid YAML"):
        load_yaml(bad)
