"""Preference data at --max-seq-len and KTO's own rows and batch (issue 34; failure catalog row 42).

Induced for real on LLaMA-Factory's demo files (``tests/data/llamafactory``, unchanged) and tiny models: TRL cuts
DPO/KTO sequences to ``max_length`` and drops the rows whose prompt fills it; each is counted as SFT counts them
(G4T318, G4T319), the report's pair count is what TRL trains, and nothing left is G4T530 before any step (TRL's
collator otherwise ends in an IndexError). KTO at batch size 1, which TRL's KTOTrainer refuses with a ValueError,
is G4T005 before any model loads. KTO reads LLaMA-Factory's unpaired ``messages`` + ``label`` rows and TRL's
``prompt``/``completion``/``label`` rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma4_tune.config.options import RunConfig
from gemma4_tune.data.formats import ChatOptions
from gemma4_tune.data.preference import LabelledAnswer, PreferencePair, load_preference_data
from gemma4_tune.findings import FindingError
from tests.test_dpo import cli

LF = Path(__file__).parent / "data" / "llamafactory" / "data"


def _subset(name: str, rows: int, folder: Path, start: int = 0) -> Path:
    """The first ``rows`` rows (from ``start``) of a LLaMA-Factory demo file, as that file has them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    out.write_text(json.dumps(json.loads((LF / name).read_text())[start:start + rows]))
    return out


def _codes(findings) -> list[str]:
    return [f.code for f in findings]


# --------------------------------------------------------------------------- KTO's unpaired rows


def test_kto_reads_llamafactory_kto_rows_with_their_labels_and_dpo_refuses_them() -> None:
    items, report, findings = load_preference_data(LF / "kto_en_demo.json", unpaired=True)
    raw = json.loads((LF / "kto_en_demo.json").read_text())
    assert len(items) == 300 and all(isinstance(item, LabelledAnswer) for item in items) and findings == []
    assert [item.label for item in items] == [row["label"] for row in raw]
    assert report.labels == {"desirable": 150, "undesirable": 150} and report.formats == {"kto-messages": 300}
    assert "300 unpaired answers (150 desirable, 150 undesirable)" in report.summary()
    multi = next(i for i, row in enumerate(raw) if len(row["messages"]) == 6)  # earlier turns stay in the prompt
    assert [m["role"] for m in items[multi].prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert items[multi].completion[0]["content"][0]["text"] == raw[multi]["messages"][-1]["content"]
    with pytest.raises(FindingError) as info:  # DPO: an answer with a label has no pair to compare
        load_preference_data(LF / "kto_en_demo.json")
    (found,) = info.value.findings
    assert found.code == "G4T324" and "300 of 300 rows are unpaired" in found.message and "--method kto" in found.fix


def test_kto_reads_trl_unpaired_rows_and_a_column_mapping_renames_lf_columns(tmp_path) -> None:
    rows = [{"prompt": "Colour of the sky?", "completion": "Blue.", "label": True},
            {"prompt": [{"role": "user", "content": "Colour of grass?"}],
             "completion": [{"role": "assistant", "content": "Purple."}], "label": False}]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, report, _ = load_preference_data(path, unpaired=True)
    assert [(i.format, i.label, i.plain_text) for i in items] == [("unpaired", True, True), ("unpaired", False, False)]
    assert items[1].completion == [{"role": "assistant", "content": [{"type": "text", "text": "Purple."}]}]
    # a column mapping (ours -> the file's; LLaMA-Factory's kto_tag is our label) renames before detection, and a
    # column it does not map is reported under the file's name
    lf = {"turns": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}], "flag": False, "id": 7}
    mapped = tmp_path / "mapped.json"
    mapped.write_text(json.dumps([lf]))
    options = ChatOptions(columns={"messages": "turns", "label": "flag"})
    (item,), report, findings = load_preference_data(mapped, options=options, unpaired=True)
    assert item.label is False and item.completion[0]["content"][0]["text"] == "Hello." and report.formats == {
        "kto-messages": 1}
    assert _codes(findings) == ["G4T305"] and findings[0].details["fields"] == {"id": 1}
    bad = tmp_path / "bad.jsonl"  # a label that is not a boolean would train the wrong way if guessed at
    bad.write_text(json.dumps({**rows[0], "label": "yes"}) + "\n")
    with pytest.raises(FindingError) as info:
        load_preference_data(bad, unpaired=True)
    assert _codes(info.value.findings) == ["G4T328"] and "bad_field" in info.value.findings[0].message
    extra = tmp_path / "extra.jsonl"  # a field nothing reads is reported, as for every other row
    extra.write_text(json.dumps({**rows[0], "score": 0.7}) + "\n")
    _, _, findings = load_preference_data(extra, unpaired=True)
    assert _codes(findings) == ["G4T305"] and "score" in findings[0].message


def test_kto_rows_mix_pairs_and_unpaired_answers_each_with_its_source(tmp_path) -> None:
    from gemma4_tune.train.methods.kto import kto_dataset

    pairs = _subset("dpo_en_demo.json", 2, tmp_path)
    answers = _subset("kto_en_demo.json", 3, tmp_path)
    items, _, _ = load_preference_data([pairs, answers], unpaired=True)
    assert [type(i) for i in items] == [PreferencePair] * 2 + [LabelledAnswer] * 3
    rows = kto_dataset(items)
    raw = json.loads(answers.read_text())
    assert rows["label"] == [True, False, True, False] + [r["label"] for r in raw]
    assert rows["source"][:2] == [f"{pairs}#0 (chosen)", f"{pairs}#1 (rejected)"]
    assert rows["source"][4:] == [f"{answers}#{i}" for i in range(3)]


# --------------------------------------------------------------------------- KTO at batch size 1


def test_kto_at_batch_size_1_is_g4t005_before_any_model_loads(tmp_path) -> None:
    from gemma4_tune.train.methods.kto import METHOD as kto

    data = _subset("kto_en_demo.json", 4, tmp_path)
    cfg = RunConfig(model=str(tmp_path / "no-model-needed"), data=str(data), method="kto", batch_size=1,
                    grad_accum=8)
    with pytest.raises(FindingError) as info:
        kto.read_data(cfg)
    (found,) = info.value.findings
    assert found.code == "G4T005" and "--batch-size 2 --grad-accum 4" in found.fix
    assert "batch_size" in found.message and "KL" in found.message
    odd = RunConfig(model="m", data=str(data), method="kto", batch_size=1, grad_accum=1)
    with pytest.raises(FindingError) as info:
        kto.read_data(odd)
    assert "--batch-size 2" in info.value.findings[0].fix and "from 1 to 2" in info.value.findings[0].fix
    assert len(kto.read_data(RunConfig(model="m", data=str(data), method="kto", batch_size=2)).pairs) == 4
    proc = cli("train", "--method", "kto", "--model", tmp_path / "no-model-needed", "--data", data,
               "--batch-size", 1, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "G4T005" in proc.stderr, proc.stderr[-2000:]  # a settings error, as RunConfig's
    assert "Traceback" not in proc.stderr and "ValueError" not in proc.stderr


@pytest.mark.slow
def test_trl_kto_refuses_batch_size_1_itself_and_kto_en_demo_trains_at_2(tiny_models, tmp_path) -> None:
    from gemma4_tune.train.methods.kto import METHOD as kto

    data = _subset("kto_en_demo.json", 6, tmp_path / "data")
    cfg = RunConfig(model=str(tiny_models["31b"]), data=str(data), method="kto", targets="text", rank=8,
                    batch_size=2, max_seq_len=8192, out=str(tmp_path / "probe"))
    read = kto.read_data(cfg)
    with pytest.raises(ValueError, match="batch size must be > 1"):  # what G4T005 stands in front of
        kto.build_trainer(cfg.model_copy(update={"batch_size": 1}), read, tmp_path / "staging")
    out = tmp_path / "run"
    proc = cli("train", "--method", "kto", "--model", tiny_models["31b"], "--data", data, "--targets", "text",
               "--max-steps", 2, "--batch-size", 2, "--rank", 8, "--max-seq-len", 8192, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labels"] == {"desirable": 4, "undesirable": 2}
    assert report["data"]["answers"] == 6 and report["kto"]["rows"]["trained"] == 6
    assert report["summary"]["answers trained"].startswith("6 of 6")  # (the tiny tokenizer cuts one at 8192)
    assert (out / "kto.png").is_file()  # the first batch holds desirable answers only: TRL logs no rejected figure


# --------------------------------------------------------------------------- DPO/KTO at --max-seq-len


def _tokens(processor, messages: list, **kwargs) -> int:
    """Tokens of ``messages`` rendered with the model's own chat template."""
    from gemma4_tune.train.base import trl_messages

    ids = processor.apply_chat_template(trl_messages(messages), tokenize=True, return_dict=True, **kwargs)
    return len(ids["input_ids"][0])


def _full_lengths(processor, items) -> list[tuple[int, int]]:
    """(prompt, prompt + longer answer) tokens of each pair or unpaired answer."""
    return [(_tokens(processor, i.prompt, add_generation_prompt=True),
             max(_tokens(processor, [*i.prompt, *answer]) for answer in (
                 (i.completion,) if isinstance(i, LabelledAnswer) else (i.chosen, i.rejected)))) for i in items]


@pytest.fixture(scope="module")
def demo_pairs(tiny_models, tmp_path_factory):
    """Twelve dpo_en_demo pairs (and six held out), their lengths, and a --max-seq-len that cuts some, drops some
    and keeps some whole."""
    from transformers import AutoProcessor

    from gemma4_tune.data.preference import load_preference_data

    root = tmp_path_factory.mktemp("dpo-demo")
    train, held = _subset("dpo_en_demo.json", 12, root), _subset("dpo_en_demo.json", 6, root / "held", start=100)
    pairs, _, _ = load_preference_data(train)
    processor = AutoProcessor.from_pretrained(str(tiny_models["31b"]))
    lengths = _full_lengths(processor, pairs)
    prompts = sorted(p for p, _ in lengths)
    limit = prompts[len(prompts) - 3]  # the three longest prompts fill it
    return train, held, lengths, limit


@pytest.mark.slow
def test_dpo_counts_pairs_cut_and_dropped_at_max_seq_len_as_trl_trains_them(tiny_models, demo_pairs, tmp_path):
    train, held, lengths, limit = demo_pairs
    cut = sum(full > limit and prompt < limit for prompt, full in lengths)
    dropped = sum(prompt >= limit for prompt, _ in lengths)
    assert cut and dropped == 3 and cut + dropped < len(lengths), (lengths, limit)
    out = tmp_path / "run"
    proc = cli("train", "--method", "dpo", "--model", tiny_models["31b"], "--data", train, "--eval-data", held,
               "--targets", "text", "--max-steps", 1, "--batch-size", 2, "--rank", 8, "--max-seq-len", limit,
               "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    found = {f["code"]: f for f in report["findings"] if f["details"].get("split") == "training"}
    assert found["G4T318"]["details"]["rows"] == cut and f"{cut} of 12 training pairs" in found["G4T318"]["message"]
    assert found["G4T319"]["details"]["rows"] == dropped and "TRL drops 3" in found["G4T319"]["message"]
    assert "failure catalog row 42" in found["G4T318"]["message"]
    rows = report["dpo"]["rows"]
    assert rows == {"given": 12, "trained": 12 - dropped, "truncated": cut, "fully_truncated": dropped,
                    "dropped_by_trl": dropped, "longest": max(full for p, full in lengths if p < limit)}
    assert report["data"]["pairs"] == 12 - dropped == report["data"]["train_conversations"]  # what was trained
    assert report["data"]["truncated"] == cut and report["data"]["kept"] == 12  # read and valid: all of them
    assert report["summary"]["pairs trained"] == (f"{12 - dropped} of 12 ({cut} cut to --max-seq-len, {dropped} with "
                                                  f"no answer token left ({dropped} dropped by TRL))")
    markdown = (out / "report.md").read_text()
    assert "pairs trained" in markdown and "dropped by TRL" in markdown
    assert report["data"]["eval_trl_rows"]["given"] == 6


@pytest.mark.slow
def test_dpo_with_every_pair_cut_away_is_g4t530_before_any_step_not_an_index_error(tiny_models, demo_pairs,
                                                                                  tmp_path):
    train, held, lengths, _ = demo_pairs
    limit = min(prompt for prompt, _ in lengths)
    out = tmp_path / "run"
    for command in ("train", "preflight"):
        proc = cli(command, "--method", "dpo", "--model", tiny_models["31b"], "--data", train, "--targets", "text",
                   "--max-steps", 1, "--batch-size", 2, "--rank", 8, "--max-seq-len", limit,
                   *(["--out", out] if command == "train" else []))
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "G4T530" in proc.stderr and "all 12 training pairs" in proc.stderr, proc.stderr[-3000:]
        assert "IndexError" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "adapter").exists() and not list(out.glob("metrics.jsonl"))


@pytest.mark.slow
def test_kto_counts_answers_cut_and_dropped_and_every_answer_cut_away_is_g4t530(tiny_models, tmp_path):
    from transformers import AutoProcessor

    from gemma4_tune.train.methods.kto import METHOD as kto

    data = _subset("kto_en_demo.json", 8, tmp_path / "data")
    cfg = RunConfig(model=str(tiny_models["31b"]), data=str(data), method="kto", targets="text", rank=8,
                    batch_size=2, out=str(tmp_path / "run"))
    read = kto.read_data(cfg)
    lengths = _full_lengths(AutoProcessor.from_pretrained(cfg.model), read.pairs)
    limit = sorted(p for p, _ in lengths)[-2]  # the two longest prompts fill it
    cut = sum(full > limit and prompt < limit for prompt, full in lengths)
    dropped = sum(prompt >= limit for prompt, _ in lengths)
    built = kto.build_trainer(cfg.model_copy(update={"max_seq_len": limit}), read, tmp_path / "staging")
    assert len(built["trainer"].train_dataset) == 8 - dropped  # TRL's own drop
    found = {f.code: f for f in built["findings"]}
    assert found["G4T318"].details["rows"] == cut and found["G4T319"].details["rows"] == dropped
    assert read.summary["answers"] == 8 - dropped and read.summary["trl_rows"]["dropped_by_trl"] == dropped
    short = min(p for p, _ in lengths)
    with pytest.raises(FindingError) as info:
        kto.build_trainer(cfg.model_copy(update={"max_seq_len": short}), kto.read_data(cfg), tmp_path / "s2")
    assert _codes(info.value.findings) == ["G4T530"] and "all 8 training answers" in info.value.findings[0].message
