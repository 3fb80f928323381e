"""Issue 10: held-out evaluation, base-vs-tuned samples, compare, and a report that renders in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lora_helpers import full_logits_sums, random_lora_model

CLI = [sys.executable, "-m", "gemma4_tune"]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRE = bool(os.environ.get("GEMMA4_TUNE_REQUIRE_ENGINES"))


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def e2b_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """E2B with random LoRA on text and vision, its batcher, and a few demo conversations (one with an image)."""
    from transformers import AutoProcessor

    from gemma4_tune.data.collate import Gemma4Batcher
    from gemma4_tune.data.demo_data import write_demo_dataset
    from gemma4_tune.data.records import load_conversations

    base = tiny_models["e2b"]
    model = random_lora_model(base, "text,vision")
    batcher = Gemma4Batcher(AutoProcessor.from_pretrained(str(base)))
    convs, _ = load_conversations(write_demo_dataset(tmp_path_factory.mktemp("eval-data"), n=12))
    return model, batcher, convs


def test_eval_loss_is_the_training_loss_on_the_same_batch(e2b_lora) -> None:
    """Same masking, same shift, per supervised token: eval and training loss agree on one batch."""
    from gemma4_tune.train.evaluate import evaluate

    model, batcher, convs = e2b_lora
    examples = [batcher.encode(c) for c in convs[:3]]
    batch = batcher.collate(examples)
    labels = batch.pop("labels")
    model.train()
    with torch.no_grad():
        total, count, hits = full_logits_sums(model(**batch).logits, labels)
    training_loss = float(total / count)
    whole = evaluate(model, batcher, examples, batch_size=3)
    one_by_one = evaluate(model, batcher, examples, batch_size=1)
    assert whole.loss == pytest.approx(training_loss, rel=1e-5)
    assert one_by_one.loss == pytest.approx(training_loss, rel=1e-5)  # per token, not a mean of batch means
    assert whole.tokens == sum(int(e["num_supervised"]) for e in examples) == int(count)
    # accuracy: the greedy hits of the full logits at the supervised positions (same shift and mask as the loss)
    assert whole.accuracy == pytest.approx(int(hits) / int(count))
    assert model.training  # evaluate restores the mode it found


def test_samples_show_reference_base_and_tuned_answers(e2b_lora) -> None:
    from gemma4_tune.train.evaluate import generate_samples, pick_samples

    model, batcher, convs = e2b_lora
    picked = pick_samples(convs, 3)
    kinds = ["image" if c.images else "audio" if c.audios else "text" for c in picked]
    assert len(picked) == 3 and "image" in kinds and "audio" in kinds and "text" in kinds
    samples = generate_samples(model, batcher, [c for c in picked if not c.audios], held_out=True,
                               max_new_tokens=6)
    for sample, conv in zip(samples, [c for c in picked if not c.audios], strict=True):
        last = [m for m in conv.messages if m["role"] == "assistant"][-1]
        assert sample.reference == "".join(p["text"] for p in last["content"] if p["type"] == "text")
        assert sample.prompt and sample.source == conv.source and sample.held_out
    assert any(s.base != s.tuned for s in samples)  # the adapter is not disabled in the tuned column


@pytest.fixture(scope="module")
def two_runs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two short E2B runs with a held-out split (different learning rates)."""
    from gemma4_tune.data.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("eval-runs")
    data = write_demo_dataset(root / "data", n=20)
    runs = []
    for name, lr in (("fast", 1e-2), ("slow", 1e-3)):
        out = root / name
        proc = cli("train", "--model", tiny_models["e2b"], "--data", data, "--out", out, "--targets", "text",
                   "--max-steps", 4, "--batch-size", 2, "--lr", lr, "--eval-split", 0.2, "--eval-steps", 2,
                   "--samples", 2, "--sample-max-tokens", 4)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(out)
    return runs[0], runs[1]


@pytest.mark.slow
def test_eval_runs_at_start_every_n_steps_and_at_the_end(two_runs) -> None:
    run = two_runs[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[0]["tokens"] == 0 and evals[-1]["tokens"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["eval_conversations"] == 4 and report["data"]["train_conversations"] == 16
    assert len(report["samples"]) == 2 and all(s["held_out"] for s in report["samples"])
    assert "held-out loss (base -> tuned)" in report["summary"]
    markdown = (run / "report.md").read_text()
    assert "## Held-out evaluation" in markdown and "## Samples" in markdown and "## Curves" in markdown


@pytest.mark.slow
def test_compare_two_runs_in_one_table_and_plot(two_runs, tmp_path: Path) -> None:
    proc = cli("compare", *two_runs, "--out", tmp_path / "cmp", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["name"] for r in report["runs"]] == ["fast", "slow"]
    fast, slow = report["runs"]
    assert fast["steps"] == slow["steps"] == 4 and fast["settings"]["lr"] == 1e-2 and slow["settings"]["lr"] == 1e-3
    assert fast["eval_loss_end"] < slow["eval_loss_end"]  # the larger learning rate moves further in 4 steps
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000
    assert "| fast |" in (tmp_path / "cmp" / "compare.md").read_text()
    alone = cli("compare", two_runs[0], "--out", tmp_path / "x")
    assert alone.returncode == 1 and "G4T409" in alone.stdout + alone.stderr


def test_eval_data_and_eval_split_together_are_refused(tmp_path: Path) -> None:
    proc = cli("preflight", "--model", tmp_path, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "o",
               "--eval-data", tmp_path / "e.jsonl", "--eval-split", 0.1)
    assert proc.returncode == 2 and "G4T005" in proc.stdout + proc.stderr  # settings: a usage error
    assert "not both" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_eval_data_repeating_training_rows_is_reported(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [
        {"messages": [{"role": "user", "content": "What is 9 plus 9?"}, {"role": "assistant", "content": "18."}]}]))
    proc = cli("train", "--model", tiny_models["31b"], "--data", tmp_path / "train.jsonl", "--out", tmp_path / "run",
               "--eval-data", tmp_path / "eval.jsonl", "--max-steps", 2, "--samples", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    [overlap] = [f for f in report["findings"] if f["code"] == "G4T407"]
    assert "2 of 3 held-out conversations" in overlap["message"]


needs_browser = pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not REQUIRE,
                                   reason="Debian's chromium and chromium-driver are not installed (make browser)")


@pytest.mark.slow
@pytest.mark.engine
@needs_browser
def test_report_html_renders_plot_and_tables_in_headless_chromium(two_runs, tmp_path: Path) -> None:
    """A broken report cannot land: the real browser must decode the plot and lay out the tables."""
    from io import BytesIO

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver are required (make browser)"
    report = two_runs[0] / "report.html"
    assert "src=\"data:image/png;base64," in report.read_text()  # self-contained: no file next to it needed
    moved = tmp_path / "alone.html"
    shutil.copy(report, moved)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(moved.as_uri())
        sections = [s.get_attribute("id") for s in driver.find_elements(By.TAG_NAME, "section")]
        for expected in ("result", "held-out-evaluation", "curves", "samples", "settings", "data", "lora-targets",
                         "preflight", "timings-and-throughput", "versions"):
            assert expected in sections
        [img] = driver.find_elements(By.TAG_NAME, "img")
        complete, width, height = driver.execute_script(
            "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert complete and width >= 600 and height >= 200  # the PNG decoded
        assert img.size["width"] > 300 and img.size["height"] > 100  # and is laid out on the page
        plot = Image.open(BytesIO(img.screenshot_as_png)).convert("RGB")
        colours = {plot.getpixel((x, y)) for x in range(0, plot.width, 4) for y in range(0, plot.height, 4)}
        assert len(colours) > 20  # lines, markers and text, not a blank box
        samples = driver.find_element(By.CSS_SELECTOR, "#samples table")
        assert len(samples.find_elements(By.CSS_SELECTOR, "tbody tr")) == 2
        assert samples.size["height"] > 40 and samples.size["width"] > 300
        evals = driver.find_elements(By.CSS_SELECTOR, "#held-out-evaluation table")[1]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in evals.find_elements(By.CSS_SELECTOR,
                                                                                      "tbody tr")] == ["0", "2", "4"]
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] >= 1000
    finally:
        driver.quit()


def test_samples_say_whether_the_tuned_model_stops_at_its_end_of_turn(e2b_lora) -> None:
    """Catalog row 29: a model that never learned <turn|> rambles to the token budget; the samples record it."""
    from gemma4_tune.data.chat import END_OF_TURN
    from gemma4_tune.train.evaluate import generate_samples, pick_samples

    model, batcher, convs = e2b_lora
    picked = [c for c in pick_samples(convs, 3) if not c.images and not c.audios][:1]
    stops = [batcher.tokenizer.convert_tokens_to_ids(END_OF_TURN), batcher.tokenizer.eos_token_id]
    head = model.get_output_embeddings()

    def run(push: float) -> bool:
        def hook(_module, _inputs, logits):  # what training does to the end-of-turn logit, exaggerated
            logits[..., stops] += push
            return logits

        handle = head.register_forward_hook(hook)
        try:
            [sample] = generate_samples(model, batcher, picked, held_out=True, max_new_tokens=4)
        finally:
            handle.remove()
        return sample.tuned_stopped

    assert run(100.0) and not run(-100.0)
