"""Training memory and speed at Gemma 4's real vocabulary: `gemma4-tune train` vs TRL SFTTrainer + PEFT.

The other CPU benchmarks use a model with a vocabulary of ~800, which hides the cost that dominates
real Gemma 4 training: the vocabulary projection, [batch, seq, 262,144] logits. This one builds (seeded,
in a temp dir) a Gemma 4 with the real vocabulary (262,144, also for the per-layer embeddings) and the
real E2B text width and layer shapes (hidden 1536, MLP 6144, double-wide on KV-shared layers, 8 heads of
256 / 512, one KV head, PLE 256 per layer), only fewer layers (4 by default: sliding + full producers,
sliding + full KV-shared consumers) and the small benchmark vision tower. It goes through the same
builder users take (``gemma4_tune.api.tiny_model``): the tiny BPE tokenizer's model vocabulary is
padded with unreachable filler entries up to 262,144 before the model is made, so tokenization and
every special id are unchanged and the embeddings, the tied lm_head and the per-layer embeddings all
have the real row count.

Data resemble real SFT: a ~60-word system prompt, two user/assistant turns, short answers (most
positions carry no label), an image in the first user turn of some rows. Generated and seeded.

Sides, each a fresh process measured with ``/usr/bin/time -v`` (peak RSS), interleaved
(ours, trl, ours-packed, trl-packed, then the same again):

- ``ours``: `gemma4-tune train` (CLI), unpacked;
- ``trl``: TRL SFTTrainer + PEFT LoRA, conversational ``messages`` with ``assistant_only_loss=True``
  (TRL 1.16 ships no Gemma 4 training template, so it is given gemma4-tune's v5 training template, the
  official v5 template plus ``{% generation %}`` markers, through ``chat_template_path``), unpacked;
- ``ours_packed``: `gemma4-tune train --packing`;
- ``trl_packed``: TRL's best packing, ``packing=True`` with the default ``bfd`` strategy (which turns
  padding-free on). TRL refuses packing and padding-free for datasets with images, so both packed
  sides train the text-only version of the data (the same rows without the image parts).

Same LoRA (rank, alpha, language-model q/k/v/o/gate/up/down), lr, batch size, max length, seed and
one epoch on both sides. Whether both trained the same batches is measured (``same_work``): with
lora_B at zero the first step's loss is the base model's on the first batch.

``--profile`` also runs one step of each side (ours, trl) under ``torch.profiler`` with
``profile_memory=True`` and writes the top allocations (op, input shapes, MB) to
bench/results/real_vocab_profile.json. ``--dry-run`` builds the model and the data and exits.

Writes bench/results/real_vocab.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

VOCAB = 262_144
# E2B's text values (model/variants/gemma-4-e2b.json), all but the depth.
E2B_TEXT = {"hidden_size": 1536, "intermediate_size": 6144, "num_attention_heads": 8, "num_key_value_heads": 1,
            "head_dim": 256, "global_head_dim": 512, "hidden_size_per_layer_input": 256, "sliding_window": 512,
            "max_position_embeddings": 131072}
E2B_INIT_STD = 0.02  # the published initializer_range (the tiny builder's 0.1 is for hidden size 64)

BATCH_SIZE = 4
MAX_SEQ_LEN = 512
RANK = 16
LR = 2e-4
SEED = 0
STEPS = 8
ROUNDS = 2
SIDES = ("ours", "trl", "ours_packed", "trl_packed")
TEXT_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROFILE_TOP = 25

# The builder, run in a fresh interpreter so the widened tiny config never leaks into the caller.
_BUILD = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import real_vocab as rv
from gemma4_tune.model import tiny
from gemma4_tune.api import tiny_model
import common
layers = int(sys.argv[4])
tiny.TINY_TEXT.update(rv.E2B_TEXT)
tiny.TINY_VISION.update(common.BENCH_VISION)
tiny.TINY_INIT_STD = rv.E2B_INIT_STD
original_layers = tiny.miniature_layer_types
def miniature(layer_types, shared):
    if layers == 4:  # one sliding + one full producer, then the same two KV-shared
        return ["sliding_attention", "full_attention"] * 2, 2 if shared else 0
    return original_layers(layer_types, shared)
tiny.miniature_layer_types = miniature
original_save = tiny.save_tokenizer
def save_tokenizer(out_dir, chat_template, vocab_size=1024):
    ids = original_save(out_dir, chat_template, vocab_size)
    rv.pad_vocabulary(Path(out_dir) / "tokenizer.json", rv.VOCAB)
    return ids
tiny.save_tokenizer = save_tokenizer
tiny_model(sys.argv[2], sys.argv[3], seed=int(sys.argv[5]))
"""


def pad_vocabulary(path: Path, size: int) -> None:
    """Pad a tokenizer.json's BPE vocabulary to ``size`` ids with filler pieces no merge produces.

    The added (special) tokens keep their ids, tokenization of any text is unchanged, and
    ``len(tokenizer)`` becomes ``size``, so the model built from it has ``size`` embedding rows.
    """
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    n = max(used) + 1
    for i in range(n, size):
        vocab[f"<unused_filler_{i}>"] = i
    path.write_text(json.dumps(tok, ensure_ascii=False))


def build_model(out: Path, *, layers: int = 4, seed: int = SEED) -> Path:
    """Build the real-vocabulary E2B-width model into ``out`` (seeded); return it."""
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(common.BENCH), "e2b", str(out), str(layers), str(seed)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building the real-vocabulary model failed:\n{proc.stderr[-3000:]}")
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    if cfg["vocab_size"] != VOCAB or cfg.get("vocab_size_per_layer_input") != VOCAB:
        raise RuntimeError(f"built vocab_size {cfg['vocab_size']}, per-layer {cfg.get('vocab_size_per_layer_input')}")
    return out


# ---------------------------------------------------------------------------------------------- data
def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(common.WORDS) for _ in range(n))


def _image(path: Path, rng: random.Random) -> None:
    """A seeded picture: coloured rectangles on a background (PNG)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (rng.choice((128, 160, 192)), rng.choice((128, 160, 192))),
                    tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randrange(img.width // 2), rng.randrange(img.height // 2)
        draw.rectangle([x0, y0, x0 + rng.randint(10, img.width // 2), y0 + rng.randint(10, img.height // 2)],
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    img.save(path)


def sft_chat(root: Path, rows: int, *, image_share: float = 0.25, system_words: int = 60, answer_median: int = 8,
             answer_sigma: float = 0.7, answer_max: int = 60, seed: int = SEED) -> dict[str, Any]:
    """Two JSONL files of the same seeded conversations: ``chat.jsonl`` (with images) and ``chat_text.jsonl``.

    Every row: a system prompt of about ``system_words`` words, two user/assistant turns, log-normal
    short answers. In ``image_share`` of the rows the first user turn starts with an image. Both files
    use the messages + ``images`` column form (path-less ``{"type": "image"}`` parts) that gemma4-tune
    and TRL both read; content is always a list of parts so the dataset has one schema.

    The system prompt is two text parts: TRL hands every message to the template as a list of parts
    (the official template renders each system part as ``text | trim + ' '``), while gemma4-tune turns
    a one-part text list into a string (rendered without that space); with two parts both render the
    official list form, so both sides tokenize the same text.
    """
    rng = random.Random(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    answers, with_image = [], 0
    with (root / "chat.jsonl").open("w") as full, (root / "chat_text.jsonl").open("w") as text_only:
        for i in range(rows):
            n = rng.randint(system_words - 8, system_words + 8)
            system = [_words(rng, n // 2).capitalize() + ".", _words(rng, n - n // 2).capitalize() + "."]
            turns = []
            for _ in range(2):
                question = _words(rng, rng.randint(6, 18)).capitalize() + "?"
                n = min(answer_max, max(1, round(rng.lognormvariate(math.log(answer_median), answer_sigma))))
                answers.append(n)
                turns.append((question, _words(rng, n).capitalize() + "."))
            image = rng.random() < image_share
            images = []
            if image:
                path = media / f"img_{i:04d}.png"
                _image(path, rng)
                images.append(str(path))
                with_image += 1
            for f, keep_image in ((full, True), (text_only, False)):
                messages = [{"role": "system", "content": [{"type": "text", "text": t} for t in system]}]
                for t, (question, answer) in enumerate(turns):
                    parts = [{"type": "image"}] if (t == 0 and image and keep_image) else []
                    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": question}]})
                    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
                row: dict[str, Any] = {"messages": messages}
                if f is full:
                    row["images"] = images if keep_image else []
                f.write(json.dumps(row) + "\n")
    answers.sort()
    return {"rows": rows, "rows_with_image": with_image, "files": ["chat.jsonl (with images)",
                                                                   "chat_text.jsonl (image parts removed)"],
            "system_prompt_words": f"{system_words - 8}-{system_words + 8}", "turns": 2,
            "answer_words": {"distribution": f"log-normal(median {answer_median}, sigma {answer_sigma}), cut at "
                                             f"{answer_max}", "min": answers[0], "median": answers[len(answers) // 2],
                             "p90": answers[int(len(answers) * 0.9)], "max": answers[-1]},
            "image": "one PNG (128-192 px, coloured rectangles) in the first user turn"}


# ------------------------------------------------------------------------------------------- sides
def _time_v(path: Path) -> dict[str, Any]:
    """Peak RSS (MB) and wall seconds from a ``/usr/bin/time -v -o`` file."""
    text = path.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return {"peak_rss_mb": round(rss / 1024, 1), "wall_seconds": round(seconds, 1)}


def _measured(cmd: list[str], out: Path, what: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run ``cmd`` under ``/usr/bin/time -v`` in a fresh process; its result and time's figures.

    Where there is no ``/usr/bin/time`` (a bare GPU image), the child's own rusage from ``os.wait4``
    gives the same peak RSS.
    """
    out.mkdir(parents=True, exist_ok=True)
    timing = out / "time-v.txt"
    if Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(timing), *cmd], capture_output=True, text=True)
        timed = _time_v(timing) if timing.exists() and timing.stat().st_size else {}
    else:
        started = time.perf_counter()
        with (out / "stdout.txt").open("w+") as so, (out / "stderr.txt").open("w+") as se:
            child = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
            _, status, usage = os.wait4(child.pid, 0)
            so.seek(0)
            se.seek(0)
            proc = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), so.read(), se.read())
        timed = {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                 "wall_seconds": round(time.perf_counter() - started, 1), "measured_by": "os.wait4"}
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc, timed


def ours_settings(model: Path, data: Path, out: Path, *, packing: bool, steps: int | None) -> Path:
    """The run file of a `gemma4-tune train` side."""
    from gemma4_tune.config.options import RunConfig

    settings = {"model": str(model), "data": str(data), "out": str(out / "run"), "batch_size": BATCH_SIZE,
                "max_seq_len": MAX_SEQ_LEN, "rank": RANK, "lr": LR, "epochs": 1, "save_steps": 100_000,
                "packing": packing, "preflight": False, "seed": SEED}
    if steps:
        settings["max_steps"] = steps
    if "samples" in RunConfig.model_fields:  # generated answers are a report feature, not training
        settings["samples"] = 0
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.yaml"
    run_file.write_text(yaml.safe_dump(settings))
    return run_file


def run_ours(model: Path, data: Path, out: Path, *, packing: bool, steps: int | None = None) -> dict[str, Any]:
    """`gemma4-tune train` (the CLI) in a fresh process under /usr/bin/time -v.

    The CLI's own ``__main__`` runs inside ``real_vocab.py _run ours`` (the same code path as
    ``python -m gemma4_tune train``), so the process can also report the peak RSS at the end of the
    training loop and, on CUDA, its ``torch.cuda.max_memory_allocated``.
    """
    run_file = ours_settings(model, data, out, packing=packing, steps=steps)
    stats = out / "stats.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", "ours", "--run-file", str(run_file),
           "--stats-out", str(stats)]
    _, timed = _measured(cmd, out, "gemma4-tune train")
    timed.update(json.loads(stats.read_text()))
    run = out / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in rows]
    record = json.loads((run / "run.json").read_text())
    # Real tokens of the batches drawn. The counter counts a batch when it is collated and the data loader
    # fetches one batch ahead, so this equals the tokens trained only for a whole epoch (no max_steps).
    tokens = rows[-1]["tokens"]
    return {**timed, "tokens": tokens, "seconds": round(elapsed[-1], 3),
            "tokens_per_s": round(tokens / elapsed[-1], 2), "steps": len(rows), "first_loss": rows[0]["loss"],
            "mean_loss": sum(r["loss"] for r in rows) / len(rows),
            "step_seconds": [round(b - a, 3) for a, b in zip([0.0, *elapsed], elapsed)],
            "encoded_rows": record["data"]["encoded_examples"],
            "trainable_parameters": record["plan"]["trainable"]["total"]}


def run_trl(model: Path, data: Path, out: Path, *, packing: bool, steps: int | None = None,
            bf16: bool = False) -> dict[str, Any]:
    """TRL SFTTrainer + PEFT (``trl_train``) in a fresh process under /usr/bin/time -v."""
    stats = out / "stats.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", "trl", "--model", str(model), "--data", str(data),
           "--out", str(out / "run"), "--stats-out", str(stats), *(["--packing"] if packing else []),
           *(["--steps", str(steps)] if steps else []), *(["--bf16"] if bf16 else [])]
    proc, timed = _measured(cmd, out, "TRL SFTTrainer")
    return {**timed, **json.loads(stats.read_text()), **json.loads(proc.stdout.strip().splitlines()[-1])}


def trl_train(model: str, data: str, out: str, *, packing: bool, steps: int | None = None, bf16: bool = False,
              batch_size: int = BATCH_SIZE, max_len: int = MAX_SEQ_LEN, rank: int = RANK, lr: float = LR,
              seed: int = SEED) -> dict[str, Any]:
    """SFTTrainer + LoRA on conversational rows with assistant-only loss; the loop's tokens, seconds, losses.

    TRL loads the model itself from the path, in bf16 when ``bf16`` (as gemma4-tune does on CUDA),
    else fp32. ``packing`` is TRL's ``packing=True`` (``bfd``, padding-free).
    """
    from datasets import load_dataset
    from trl_baseline import sft_train

    from gemma4_tune.data.chat import training_template

    template = Path(out).parent / "gemma4_v5_training.jinja"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(training_template("v5"))
    dataset = load_dataset("json", data_files=data, split="train")
    return sft_train(model, dataset, out, batch_size=batch_size, max_len=max_len, rank=rank, lr=lr, epochs=1,
                     seed=seed, bf16=bf16, max_steps=steps or -1, assistant_only_loss=True,
                     chat_template_path=str(template), packing=packing)


# ----------------------------------------------------------------------------------------- profile
def install_step_profiler(path: Path, step: int) -> None:
    """Run training step ``step`` (0-based, counted across Trainer.training_step calls) under torch.profiler.

    ``profile_memory=True, record_shapes=True`` on the CPU; writes the top ops by memory they allocated
    themselves (grouped by input shapes), with the process's peak RSS before and after the step, to ``path``.
    """
    import resource

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    original = Trainer.training_step
    calls = {"n": 0}

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        n = calls["n"]
        calls["n"] += 1
        if n != step:
            return original(self, *args, **kwargs)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
            result = original(self, *args, **kwargs)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        events = prof.key_averages(group_by_input_shape=True)
        top = sorted(events, key=lambda e: e.self_cpu_memory_usage, reverse=True)[:PROFILE_TOP]
        path.write_text(json.dumps({
            "step": n, "step_seconds_profiled": round(seconds, 2),
            "peak_rss_mb_before_step": round(before, 1), "peak_rss_mb_after_step": round(after, 1),
            "allocated_mb_all_ops": round(sum(max(e.self_cpu_memory_usage, 0) for e in events) / 2**20, 1),
            "top": [{"op": e.key, "input_shapes": [s for s in e.input_shapes if s], "calls": e.count,
                     "self_allocated_mb": round(e.self_cpu_memory_usage / 2**20, 1),
                     "allocated_mb_with_children": round(e.cpu_memory_usage / 2**20, 1)} for e in top]},
            indent=1) + "\n")
        return result

    Trainer.training_step = training_step


def cuda_peak() -> dict[str, Any]:
    """``torch.cuda.max_memory_allocated`` (MB) of this process, when CUDA was used."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "cuda_max_memory_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}


def _rss_mb() -> float:
    """This process's resident set size now (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def install_loop_meter(box: dict[str, Any]) -> None:
    """Record RSS when ``Trainer.train`` starts (model loaded, LoRA applied) and the peak RSS when it returns."""
    import resource

    from transformers import Trainer

    original = Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        box["rss_mb_at_train_begin"] = _rss_mb()
        try:
            return original(self, *args, **kwargs)
        finally:
            box["loop_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    Trainer.train = train


def _wrapped(args: argparse.Namespace) -> None:
    """Entry of a side run in this process: ours through the CLI's own ``__main__``, TRL through ``trl_train``.

    Writes ``--stats-out``: RSS at the start of the training loop, peak RSS at its end (so the part of
    the process peak that comes after the loop shows) and, on CUDA, the peak allocated memory.
    """
    box: dict[str, Any] = {}
    install_loop_meter(box)
    if args.profile_out:
        install_step_profiler(Path(args.profile_out), args.profile_step)
    if args.side == "ours":
        import runpy

        sys.argv = ["gemma4-tune", "train", args.run_file]
        try:
            runpy.run_module("gemma4_tune", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code:
                raise
    else:
        result = trl_train(args.model, args.data, args.out, packing=args.packing, steps=args.steps, bf16=args.bf16)
        print(json.dumps(result))
    if args.stats_out:
        Path(args.stats_out).write_text(json.dumps({**box, **cuda_peak()}))


def profile_sides(model: Path, data: Path, root: Path, *, steps: int = 2) -> dict[str, Any]:
    """One profiled run of each unpacked side: step 2 of ``steps`` (step 1 when ``steps`` is 1)."""
    out: dict[str, Any] = {}
    step = min(1, steps - 1)
    for side in ("ours", "trl"):
        where = root / f"profile-{side}"
        where.mkdir(parents=True, exist_ok=True)
        target = where / "profile.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_run", side, "--profile-out", str(target),
               "--profile-step", str(step), "--steps", str(steps)]
        if side == "ours":
            cmd += ["--run-file", str(ours_settings(model, data, where, packing=False, steps=steps))]
        else:
            cmd += ["--model", str(model), "--data", str(data), "--out", str(where / "run")]
        _, timed = _measured(cmd, where, f"profiled {side}")
        out[{"ours": "gemma4_tune", "trl": "trl_sft"}[side]] = {"process": timed, **json.loads(target.read_text())}
        print(f"profile {side}: peak RSS {timed['peak_rss_mb']} MB; top op "
              f"{out[{'ours': 'gemma4_tune', 'trl': 'trl_sft'}[side]]['top'][0]}", flush=True)
    return out


# -------------------------------------------------------------------------------------------- main
def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens and loop seconds summed over a side's runs, its tokens/s, and its peak memory."""
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    out = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
           "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs_peak_rss_mb": [r["peak_rss_mb"] for r in runs],
           "wall_seconds": [r["wall_seconds"] for r in runs],
           "first_step_seconds": [r["step_seconds"][0] for r in runs],
           "steps": [r["steps"] for r in runs], "first_loss": sorted({r["first_loss"] for r in runs}),
           "trainable_parameters": sorted({r["trainable_parameters"] for r in runs})}
    if all("loop_peak_rss_mb" in r for r in runs):
        out["loop_peak_rss_mb"] = max(r["loop_peak_rss_mb"] for r in runs)
        out["rss_mb_at_train_begin"] = max(r["rss_mb_at_train_begin"] for r in runs)
    if all("cuda_max_memory_allocated_mb" in r for r in runs):
        out["cuda_max_memory_allocated_mb"] = max(r["cuda_max_memory_allocated_mb"] for r in runs)
    return out


def same_work(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """Did both sides train the same batches? Equal first-step loss (lora_B at zero) and trainable parameters.

    "Equal" is within 1e-6 relative: the two sides sum the same fp32 cross-entropies in a different
    order (TRL's fused, chunked LM head), and one fp32 ulp at a loss of 12.7 is already 9.5e-7.
    """
    a, b = ours["first_loss"][0], trl["first_loss"][0]
    diff = abs(a - b)
    rel = diff / max(abs(a), abs(b), 1.0)
    return {"first_step_loss": {"gemma4_tune": ours["first_loss"], "trl_sft": trl["first_loss"]},
            "first_step_loss_diff": diff, "first_step_loss_rel_diff": rel, "tolerance": "1e-6 relative",
            "trainable_parameters": {"gemma4_tune": ours["trainable_parameters"],
                                     "trl_sft": trl["trainable_parameters"]},
            "tokens": [ours["tokens"], trl["tokens"]],
            "same_batches": (rel <= 1e-6 and ours["trainable_parameters"] == trl["trainable_parameters"]
                             and ours["tokens"] == trl["tokens"]
                             and len(ours["first_loss"]) == len(trl["first_loss"]) == 1)}


def measure(root: Path, *, rows: int, steps: int | None, rounds: int, layers: int, model_dir: Path | None,
            bf16: bool = False, cuda: bool = False, profile: bool = False, dry_run: bool = False,
            sides: tuple[str, ...] = SIDES) -> dict[str, Any]:
    """Build (or reuse) the model and the data, run the sides interleaved; the result record's payload."""
    if model_dir is not None and (model_dir / "config.json").exists():
        model = model_dir
        built = f"reused {model_dir}"
    else:
        model = model_dir or root / "model"
        started = time.perf_counter()
        build_model(model, layers=layers)
        built = f"built in {time.perf_counter() - started:.0f} s"
    print(f"model: {model} ({built})", flush=True)
    shape = {**common.model_shape(model), "built": built,
             "how": "gemma4_tune.api.tiny_model('e2b') with E2B's text widths, 4 layers, the benchmark vision "
                    "tower, and the tokenizer's BPE vocabulary padded with unreachable filler pieces to 262,144 "
                    "before the model is made (embeddings, tied lm_head and per-layer embeddings at 262,144 rows)",
             "checkpoint_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors"))}
    described = sft_chat(root, rows)
    data = {"unpacked": root / "chat.jsonl", "packed": root / "chat_text.jsonl"}
    print(f"data: {json.dumps(described)}", flush=True)
    if dry_run:
        return {"dry_run": True, "model": shape, "data": described}
    order = [side for _ in range(rounds) for side in sides]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for i, side in enumerate(order):
        out = root / f"{i}-{side}"
        packing = side.endswith("_packed")
        file = data["packed" if packing else "unpacked"]
        result = (run_trl(model, file, out, packing=packing, steps=steps, bf16=bf16) if side.startswith("trl")
                  else run_ours(model, file, out, packing=packing, steps=steps))
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        runs[side].append(result)
        shutil.rmtree(out / "run", ignore_errors=True)  # adapters and checkpoints: not needed, and large
        print(f"{side}: {result['tokens_per_s']} tokens/s ({result['tokens']} tokens, {result['seconds']} s loop, "
              f"{result['steps']} steps), peak RSS {result['peak_rss_mb']} MB, wall {result['wall_seconds']} s, "
              f"first loss {result['first_loss']:.6f}, trainable {result['trainable_parameters']}", flush=True)
    sides_agg = {side: aggregate(r) for side, r in runs.items()}
    names = {"ours": "gemma4_tune", "trl": "trl_sft", "ours_packed": "gemma4_tune_packed",
             "trl_packed": "trl_sft_packed"}
    figures = {names[s]: v for s, v in sides_agg.items()}
    payload: dict[str, Any] = {
        "model": shape, "data": described,
        "settings": {"batch_size": BATCH_SIZE, "max_seq_len": MAX_SEQ_LEN, "rank": RANK, "alpha": 2 * RANK, "lr": LR,
                     "epochs": 1, "max_steps": steps, "seed": SEED, "gradient_checkpointing": True,
                     "dtype": "bfloat16" if bf16 else "float32", "device": "cuda" if cuda else "cpu",
                     "order": order, "lora_targets": "language-model q/k/v/o/gate/up/down projections",
                     "trl": "SFTTrainer, messages + assistant_only_loss=True, chat_template_path = gemma4-tune's v5 "
                            "training template; packed: packing=True (bfd, padding-free)",
                     "packed_data": "text-only rows (TRL refuses packing and padding-free with images)",
                     "peak_memory": "peak RSS of the whole process (/usr/bin/time -v), model weights included"},
        "figures": figures, "runs": {names[s]: v for s, v in runs.items()}}
    ratios: dict[str, float] = {}
    goals: dict[str, Any] = {}
    if "ours" in runs and "trl" in runs:
        payload["same_work"] = same_work(sides_agg["ours"], sides_agg["trl"])
        ratios["peak_rss"] = sides_agg["ours"]["peak_rss_mb"] / sides_agg["trl"]["peak_rss_mb"]
        ratios["tokens_per_s"] = sides_agg["ours"]["tokens_per_s"] / sides_agg["trl"]["tokens_per_s"]
        goals["peak_rss"] = common.goal(ratios["peak_rss"], 0.5, at_least=False)
        if "loop_peak_rss_mb" in sides_agg["ours"] and "loop_peak_rss_mb" in sides_agg["trl"]:
            ratios["loop_peak_rss"] = sides_agg["ours"]["loop_peak_rss_mb"] / sides_agg["trl"]["loop_peak_rss_mb"]
        goals["tokens_per_s"] = common.goal(ratios["tokens_per_s"], 1.5, at_least=True)
        if "cuda_max_memory_allocated_mb" in sides_agg["ours"] and "cuda_max_memory_allocated_mb" in sides_agg["trl"]:
            ratios["cuda_max_memory_allocated"] = (sides_agg["ours"]["cuda_max_memory_allocated_mb"]
                                                   / sides_agg["trl"]["cuda_max_memory_allocated_mb"])
            goals["cuda_max_memory_allocated"] = common.goal(ratios["cuda_max_memory_allocated"], 0.5, at_least=False)
    if "ours_packed" in runs and "trl_packed" in runs:
        op, tp = sides_agg["ours_packed"], sides_agg["trl_packed"]
        payload["packed_work"] = {"tokens": [op["tokens"], tp["tokens"]], "steps": [op["steps"], tp["steps"]],
                                  "first_step_loss": {"gemma4_tune": op["first_loss"], "trl_sft": tp["first_loss"]},
                                  "note": "packed batches differ between the packers (their bin packing differs), so "
                                          "first losses need not agree; the tokens trained are compared"}
        ratios["packed_tokens_per_s"] = op["tokens_per_s"] / tp["tokens_per_s"]
        ratios["packed_peak_rss"] = op["peak_rss_mb"] / tp["peak_rss_mb"]
        goals["packed_tokens_per_s"] = common.goal(ratios["packed_tokens_per_s"], 2.0, at_least=True)
    payload["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    payload["ratio"] = payload["ratios"].get("tokens_per_s")
    payload["ratio_means"] = "gemma4-tune tokens/s / TRL tokens/s (unpacked)"
    payload["goals"] = goals
    if profile:
        payload["profile"] = "bench/results/real_vocab_profile.json"
        prof = profile_sides(model, data["unpacked"], root)
        payload["profile_summary"] = {side: {"peak_rss_mb": v["process"]["peak_rss_mb"], "top": v["top"][:5]}
                                      for side, v in prof.items()}
        payload["_profile"] = prof
    return payload


def _side_parser(sub: Any) -> None:
    trl = sub.add_parser("trl", help="(internal) one TRL side in this process; prints one JSON line")
    trl.add_argument("model")
    trl.add_argument("data")
    trl.add_argument("out")
    trl.add_argument("--packing", action="store_true")
    trl.add_argument("--steps", type=int)
    trl.add_argument("--bf16", action="store_true")
    run = sub.add_parser("_run", help="(internal) one side in this process, profiled or with CUDA's peak memory")
    run.add_argument("side", choices=("ours", "trl"))
    for name in ("--run-file", "--model", "--data", "--out", "--profile-out", "--stats-out"):
        run.add_argument(name)
    run.add_argument("--profile-step", type=int, default=1)
    run.add_argument("--steps", type=int)
    run.add_argument("--packing", action="store_true")
    run.add_argument("--bf16", action="store_true")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("trl", "_run"):
        parser = argparse.ArgumentParser()
        _side_parser(parser.add_subparsers(dest="cmd"))
        a = parser.parse_args(argv)
        if a.cmd == "trl":
            print(json.dumps({**trl_train(a.model, a.data, a.out, packing=a.packing, steps=a.steps, bf16=a.bf16),
                              **cuda_peak()}))
        else:
            _wrapped(a)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=STEPS * BATCH_SIZE,
                        help=f"conversations, trained for one epoch: rows / {BATCH_SIZE} unpacked steps "
                             f"[{STEPS * BATCH_SIZE}]")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds of the sides [{ROUNDS}]")
    parser.add_argument("--layers", type=int, default=4, choices=(4, 6),
                        help="text layers: 4 (default) or 6 (the tiny builder's two sliding + one full per period)")
    parser.add_argument("--model-dir", type=Path,
                        help="reuse the model built there (build it there if missing) instead of a temp dir")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each unpacked side -> results/real_vocab_profile.json")
    parser.add_argument("--dry-run", action="store_true", help="build the model and the data, then exit")
    parser.add_argument("--name", default="real_vocab", help="result name [real_vocab]")
    a = parser.parse_args(argv)
    sides = tuple(s for s in a.sides.split(",") if s)
    if set(sides) - set(SIDES):
        parser.error(f"unknown sides {sorted(set(sides) - set(SIDES))}")
    started = common.machine()
    with tempfile.TemporaryDirectory(prefix="g4t-bench-vocab-") as tmp:
        payload = measure(Path(tmp), rows=a.rows, steps=None, rounds=a.rounds, layers=a.layers,
                          model_dir=a.model_dir, profile=a.profile, dry_run=a.dry_run, sides=sides)
    if a.dry_run:
        print("dry run: model and data built; nothing measured")
        return
    prof = payload.pop("_profile", None)
    what = ("peak RSS and tokens/s of `gemma4-tune train` vs TRL SFTTrainer + PEFT (assistant-only loss) at Gemma 4's "
            "real vocabulary (262,144) and E2B's text width; and --packing vs TRL packing=True")
    path = common.write_result(a.name, started, {"what": what, **payload})
    print(f"wrote {path}")
    if prof is not None:
        path = common.write_result(f"{a.name}_profile", started, {
            "what": "one training step of each side under torch.profiler (CPU, profile_memory=True, record_shapes): "
                    "ops by the memory they allocated themselves, grouped by input shapes",
            "model": payload["model"], "settings": payload["settings"], "sides": prof})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
