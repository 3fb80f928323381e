"""The chat template from training to serving (issue 24; failure-catalog rows 13, 29, 34, 35).

Per run: model turns whose ``<turn|>`` is not learned (G4T320/G4T321), reasoning the revision does not
render (G4T322), turns rendered unlike their generation prompt (G4T323). Per adapter: the manifest records
the template it was trained with, and ``verify`` / ``serve`` compare it with what they load (G4T812/G4T813).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoProcessor

from gemma4_tune.config.options import build_config
from gemma4_tune.data import chat
from gemma4_tune.data.collate import Gemma4Batcher
from gemma4_tune.data.records import load_conversations
from gemma4_tune.data.template_checks import template_findings
from gemma4_tune.export.manifest import MANIFEST_NAME, served_template_findings, write_manifest
from gemma4_tune.findings import FindingError, Severity
from tests.lora_helpers import random_lora

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def qa(question: str, answer: str, **assistant: object) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer, **assistant}]}


def tool_row(answer_weight: int) -> dict:
    """A tool call and its answer: one model turn in v5, closed by the answer's ``<turn|>``."""
    call = {"id": "c0", "type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}}
    return {"messages": [
        {"role": "user", "content": "What is 17 plus 25?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c0", "name": "add", "content": "42"},
        {"role": "assistant", "content": "forty-two.", "weight": answer_weight},
    ], "tools": [ADD]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def e2b(tiny_models) -> Path:
    return tiny_models["e2b"]


@pytest.fixture(scope="module")
def processor(e2b: Path):
    return AutoProcessor.from_pretrained(str(e2b))


def findings_for(processor, path: Path, revision: str = "v5", max_seq_len: int = 2048) -> dict:
    convs, _ = load_conversations(path)
    batcher = Gemma4Batcher(processor, revision=revision, max_seq_len=max_seq_len)
    found = template_findings(batcher, convs, [batcher.encode(c) for c in convs])
    assert len({f.code for f in found}) == len(found), "each check reports once per run"
    return {f.code: f for f in found}


# ------------------------------------------------------------------ row 29: the end of turn


def test_weights_that_drop_the_answers_turn_end_are_counted_then_refused(processor, tmp_path: Path) -> None:
    """The tool call is trained, its answer (weight 0) is not: the v5 turn's <turn|> carries no label."""
    some = findings_for(processor, write_rows(tmp_path / "some.jsonl", [tool_row(0), qa("Hi", "Hello."),
                                                                        tool_row(1)]))
    lost = some["G4T320"]
    assert lost.severity is Severity.WARNING and set(some) == {"G4T320"}
    assert lost.message.startswith("1 of 3 supervised model turns do not learn their closing <turn|>")
    assert f"(the first: {tmp_path / 'some.jsonl'}:1)" in lost.message and "weight 1" in lost.fix
    assert (lost.details["cut"], lost.details["unlabelled"]) == (0, 1)

    never = findings_for(processor, write_rows(tmp_path / "never.jsonl", [tool_row(0), tool_row(0)]))
    assert set(never) == {"G4T321"} and never["G4T321"].severity is Severity.ERROR
    assert "none of the 2 supervised model turns learns its closing <turn|>" in never["G4T321"].message
    assert "never learn to stop" in never["G4T321"].message
    # v2 closes the tool call's turn with its own <turn|>: the answer's weight takes its whole turn out
    assert findings_for(processor, tmp_path / "never.jsonl", revision="v2") == {}


def test_a_template_with_turn_end_outside_the_generation_markers_is_refused(processor, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom copy of the v5 training template where the model turn's <turn|> is moved out of its markers."""
    official = chat.training_template("v5")
    marked = "{%- generation -%}{{- '<turn|>' -}}{%- endgeneration -%}"
    assert official.count(marked) == 1
    edited = official.replace(marked, "{{- '<turn|>' -}}")
    monkeypatch.setattr(chat, "training_template", lambda revision: edited)
    found = findings_for(processor, write_rows(tmp_path / "d.jsonl", [qa("Hi", "Hello."), qa("Bye", "Goodbye.")]))
    assert set(found) == {"G4T321"}
    assert "none of the 2 supervised model turns" in found["G4T321"].message


def test_answers_cut_by_max_seq_len_lose_their_turn_end(processor, tmp_path: Path) -> None:
    long_answer = "one two three four five six seven eight nine ten " * 3
    found = findings_for(processor, write_rows(tmp_path / "d.jsonl", [qa("Hi", "Hello."), qa("Count", long_answer)]),
                         max_seq_len=24)
    assert set(found) == {"G4T320"} and (found["G4T320"].details["cut"], found["G4T320"].details["unlabelled"]) == (
        1, 0)
    assert "1 cut off by --max-seq-len 24" in found["G4T320"].message


# ------------------------------------------------------------------ row 35: reasoning


def test_a_run_with_a_revision_that_drops_reasoning_reports_the_rows(e2b: Path, tmp_path: Path) -> None:
    """Through the run's own preparation: the three reasoning spellings, read as reasoning_content."""
    from gemma4_tune.train.methods.sft import METHOD as sft

    rows = [qa("2+2?", "four.", reasoning_content="Two and two."), qa("3+3?", "six.", reasoning="Three and three."),
            qa("4+4?", "eight.", thinking="Four and four."), qa("Hi", "Hello.")]
    data = write_rows(tmp_path / "d.jsonl", rows)
    cfg = build_config({"model": str(e2b), "data": str(data), "template_revision": "v4",
                        "out": str(tmp_path / "unused")})
    setup = sft.prepare(cfg, sft.read_data(cfg))
    dropped = [f for f in setup.findings if f.code == "G4T322"]
    assert len(dropped) == 1 and dropped[0].severity is Severity.WARNING
    assert dropped[0].message.startswith("3 of 3 training rows with reasoning")
    assert "chat template v4 does not render" in dropped[0].message and f"{data}:1" in dropped[0].message
    assert "--template-revision v5" in dropped[0].fix and dropped[0].details["rendering_revisions"] == ["v5"]


def test_the_rendering_revision_reports_nothing(processor, tmp_path: Path) -> None:
    assert findings_for(processor, write_rows(tmp_path / "d.jsonl", [qa("2+2?", "four.", reasoning="Two and two.")]),
                        revision="v5") == {}


# ------------------------------------------------------------------ row 13: the generation prompt


def test_turns_rendered_unlike_their_generation_prompt_are_counted_once(processor, tmp_path: Path) -> None:
    twice = {"messages": [{"role": "user", "content": "Two things?"}, {"role": "assistant", "content": "One."},
                          {"role": "assistant", "content": "Two."}]}
    data = write_rows(tmp_path / "d.jsonl", [twice, qa("Hi", "Hello."), twice])
    found = findings_for(processor, data, revision="v5")
    mismatch = found["G4T323"]
    assert set(found) == {"G4T323"} and mismatch.severity is Severity.WARNING
    assert mismatch.message.startswith("2 of 3 training rows have an assistant turn that chat template v5 renders "
                                       "unlike its generation prompt")
    assert mismatch.details["case"] == "consecutive_assistant" and f"{data}:1, message 2" in mismatch.message
    assert "--template-revision v2" in mismatch.fix and "merge consecutive assistant messages" in mismatch.fix
    assert findings_for(processor, data, revision="v2") == {}


# ------------------------------------------------------------------ row 34: the template travels with the adapter


@pytest.fixture(scope="module")
def trained(e2b: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter of the v5 tiny model whose manifest records the v5 template, as train() writes it."""
    adapter = random_lora(e2b, tmp_path_factory.mktemp("tmpl") / "adapter", seed=1)
    write_manifest(adapter, e2b, training={}, versions={}, template_revision="v5")
    return adapter


def base_with_template(e2b: Path, out: Path, template: str | None) -> Path:
    """A copy of the base whose tokenizer has ``template`` (None: no chat template at all)."""
    shutil.copytree(e2b, out)
    (out / "chat_template.jinja").unlink()
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    return out


def test_the_manifest_records_the_template(trained: Path, e2b: Path) -> None:
    recorded = json.loads((trained / MANIFEST_NAME).read_text())["chat_template"]
    assert recorded == {"revision": "v5", "sha256": chat.template_sha256((e2b / "chat_template.jinja").read_text())}
    manifest = json.loads((trained / MANIFEST_NAME).read_text())
    assert served_template_findings(trained, e2b, manifest) == []


def test_serving_with_another_revision_warns_in_the_serve_plan(trained: Path, e2b: Path, tmp_path: Path) -> None:
    from gemma4_tune.serve import plan_serving

    v3 = base_with_template(e2b, tmp_path / "v3", chat.official_template("v3"))
    plan = plan_serving(v3, {"a": trained}, tmp_path / "work", flavour="cpu")
    warned = [f for f in plan.findings if f.code == "G4T812"]
    assert len(warned) == 1 and warned[0].severity is Severity.WARNING
    assert "trained with chat template v5" in warned[0].message and "serves v3" in warned[0].message
    assert "official_template('v5')" in warned[0].fix and "--template-revision v3" in warned[0].fix


def test_an_unknown_served_template_stops_verify_before_any_model_loads(trained: Path, e2b: Path,
                                                                        tmp_path: Path) -> None:
    from gemma4_tune.api import verify

    edited = base_with_template(e2b, tmp_path / "edited", "{#- a local edit -#}\n" + chat.official_template("v5"))
    with pytest.raises(FindingError) as err:
        verify(edited, trained, engines=("peft",), out=tmp_path / "verify")
    assert [f.code for f in err.value.findings] == ["G4T813"]
    assert "trained with the official chat template v5" in err.value.findings[0].message
    assert "no official Gemma 4 revision" in err.value.findings[0].message
    verdict = json.loads((tmp_path / "verify" / "verify.json").read_text())  # refused: the verdict says so
    assert (verdict["ok"], verdict["refused"], verdict["engines"]) == (False, True, [])
    assert [f["code"] for f in verdict["findings"]] == ["G4T813"]
    assert "Refused before any engine was compared" in (tmp_path / "verify" / "verify.md").read_text()
    missing = base_with_template(e2b, tmp_path / "none", None)
    assert "has no chat template" in served_template_findings(trained, missing, json.loads(
        (trained / MANIFEST_NAME).read_text()))[0].message


def test_an_adapter_without_a_recorded_template_is_not_judged(e2b: Path, tmp_path: Path) -> None:
    """Adapters of other tools (no manifest) and older manifests: a base with its own template stays usable."""
    edited = base_with_template(e2b, tmp_path / "edited", "{{ messages }}")
    assert served_template_findings(tmp_path / "adapter", edited, None) == []
    assert served_template_findings(tmp_path / "adapter", edited, {"base": {}}) == []


@pytest.mark.slow
def test_verify_warns_when_the_base_serves_another_revision(trained: Path, e2b: Path, tmp_path: Path) -> None:
    from gemma4_tune.api import verify

    v3 = base_with_template(e2b, tmp_path / "v3", chat.official_template("v3"))
    report = verify(v3, trained, engines=("peft",), out=tmp_path / "verify")
    warned = [f for f in report["findings"] if f.code == "G4T812"]
    assert len(warned) == 1 and "serves v3" in warned[0].message
    assert "G4T812" in (tmp_path / "verify" / "verify.md").read_text()


def test_a_gguf_holding_another_template_is_named_with_the_fix_for_a_gguf(trained: Path) -> None:
    """verify --engine llama.cpp compares the GGUF's tokenizer.chat_template (read by llama.cpp itself, asserted in
    test_gguf) with the manifest, by the same rule as a checkpoint's tokenizer."""
    from gemma4_tune.export.manifest import read_manifest, template_findings

    manifest = read_manifest(trained)
    put_back = "export the GGUF again from a merged checkpoint that has the {trained} template"
    assert template_findings(trained, "model-f32.gguf", chat.official_template("v5"), manifest, put_back) == []
    [warned] = template_findings(trained, "model-f32.gguf", chat.official_template("v4"), manifest, put_back)
    assert warned.code == "G4T812" and "model-f32.gguf serves v4" in warned.message
    assert warned.fix.startswith("export the GGUF again from a merged checkpoint that has the v5 template")
    [unknown] = template_findings(trained, "model-f32.gguf", None, manifest, put_back)
    assert unknown.code == "G4T813" and "model-f32.gguf has no chat template" in unknown.message
