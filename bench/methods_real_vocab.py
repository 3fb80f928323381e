"""SFT, DPO and GRPO at Gemma 4's real vocabulary (262,144): `gemma4-tune train` vs TRL used plainly.

Issue 33 item 6. The model is bench/real_vocab.py's (E2B text width, 4 layers, the real 262,144-row
embeddings, tied lm_head and per-layer embeddings), built once, seeded. Data: long user prompts
(``--prompt-words`` words) with one-word answers.

Sides, each a fresh process, interleaved (the order, then the same order reversed: A B ... B A):

- ``sft``: `gemma4-tune train` on the prompts with the chosen word as the answer;
- ``dpo``: `gemma4-tune train --method dpo` on (prompt, chosen word, rejected word);
- ``trl_dpo``: TRL's DPOTrainer used plainly (bench/trl_dpo_baseline.py, unchanged) on the same rows;
- ``grpo``: `gemma4-tune train --method grpo` with a trivial reward file, ``--num-generations 4 --batch-size 4
  --max-completion-length 8``;
- ``trl_grpo``: TRL's GRPOTrainer used plainly: TRL loads the model from the path, LoRA through ``peft_config`` on
  the plan's modules, the same prompts, reward, beta, lr, batch, generations, completion length, loss type.

Every side runs ``--steps`` optimizer steps at batch size 4, beta 0.1 (DPO and GRPO), fp32 on the CPU, activation
checkpointing. In each child process the benchmark wraps ``transformers.Trainer.train``: at its start (model
loaded, LoRA applied) it reads the RSS and resets the peak (``/proc/self/clear_refs`` 5), at its end it reads the
peak (``VmHWM``); "peak above weights" is the difference. A callback times every step (``on_step_begin`` to
``on_step_end``); tokens are the attention mask of every training batch (SFT, DPO: DPO's are [chosen; rejected])
and, for GRPO, the prompt and completion masks of every generated group (``_generate_and_score_completions``,
TRL's own method, which ours calls through ``super()``), so the count is the same on both sides.

Same work: both sides of a pair trained the same number of steps (and, DPO, the same tokens; GRPO, the same
completion tokens per step, which holds when no rollout stops before ``max_completion_length``).

``--profile-dpo`` also runs one `train --method dpo` step in-process under torch.profiler (CPU time and memory
by op). Writes bench/results/methods_real_vocab.json.

Run: ``.venv/bin/python bench/methods_real_vocab.py [--steps 4] [--prompt-words 60] [--model-dir DIR]
[--profile-dpo]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

BATCH_SIZE = 4
RANK = 16
LR = 5e-4
BETA = 0.1
SEED = 0
NUM_GENERATIONS = 4
MAX_COMPLETION = 8
MAX_LEN = 1024
ORDER = ("sft", "dpo", "trl_dpo", "grpo", "trl_grpo")

REWARD = '''
def length(prompts, completions, **kwargs):
    """A trivial reward: the completion's length in characters / 100 (varies within a group)."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        text = text if isinstance(text, str) else str(text)
        out.append(len(text) / 100.0)
    return out
'''


# ----------------------------------------------------------------------------------------------- data
def make_data(root: Path, rows: int, prompt_words: int, seed: int = SEED) -> dict[str, Any]:
    """``sft.jsonl`` (messages), ``pairs.jsonl`` (prompt/chosen/rejected), ``prompts.jsonl`` (prompt) and
    ``rewards.py``: the same prompts, one-word answers."""
    rng = random.Random(seed)
    with (root / "sft.jsonl").open("w") as sft, (root / "pairs.jsonl").open("w") as pairs, \
            (root / "prompts.jsonl").open("w") as prompts:
        for _ in range(rows):
            text = " ".join(rng.choice(common.WORDS) for _ in range(prompt_words)).capitalize() + "?"
            chosen, rejected = rng.sample(common.WORDS, 2)
            user = {"role": "user", "content": text}
            sft.write(json.dumps({"messages": [user, {"role": "assistant", "content": chosen}]}) + "\n")
            pairs.write(json.dumps({"prompt": [user], "chosen": [{"role": "assistant", "content": chosen}],
                                    "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
            prompts.write(json.dumps({"prompt": [user]}) + "\n")
    (root / "rewards.py").write_text(REWARD)
    return {"rows": rows, "prompt_words": prompt_words, "answer": "one word (chosen / rejected drawn from the word list)",
            "files": ["sft.jsonl (messages)", "pairs.jsonl (prompt/chosen/rejected)", "prompts.jsonl (prompt)"]}


# ------------------------------------------------------------------------------------- child meters
def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def install_meters(stats_path: Path) -> None:
    """Wrap Trainer.train (RSS at start, peak reset, peak at end, step times) and count the tokens trained."""
    import torch
    from transformers import Trainer, TrainerCallback

    box: dict[str, Any] = {"step_seconds": [], "batch_tokens": [], "groups": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            box["_t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            box["step_seconds"].append(round(time.perf_counter() - box.pop("_t"), 3))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "first_loss" not in box:
                box["first_loss"] = logs["loss"]

    original_train = Trainer.train
    original_step = Trainer.training_step

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.add_callback(StepTimer())
        box["rss_mb_before_touch"] = _status("VmRSS")
        with torch.no_grad():  # fault in every page of the (memory-mapped) weights, so they count as loaded
            for t in [*self.model.parameters(), *self.model.buffers()]:
                if t.device.type == "cpu" and t.numel():
                    flat = t.detach().reshape(-1)
                    flat[:: max(1, 4096 // flat.element_size())].sum()
        box["rss_mb_at_train_begin"] = _status("VmRSS")
        box["peak_rss_mb_before_train"] = _status("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            box["peak_reset"] = True
        except OSError:
            box["peak_reset"] = False
        box["trainable_parameters"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        try:
            return original_train(self, *args, **kwargs)
        finally:
            box["loop_peak_rss_mb"] = _status("VmHWM")
            box["steps"] = len(box["step_seconds"])
            box["loop_seconds"] = round(sum(box["step_seconds"]), 3)
            if box["groups"]:
                box["tokens"] = sum(g["prompt"] + g["completion"] for g in box["groups"])
            else:
                box["tokens"] = sum(box["batch_tokens"])
            box["tokens_per_s"] = round(box["tokens"] / box["loop_seconds"], 2) if box["loop_seconds"] else None
            box["peak_above_weights_mb"] = round(box["loop_peak_rss_mb"] - box["rss_mb_at_train_begin"], 1)
            stats_path.write_text(json.dumps(box))

    def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(inputs, dict) and isinstance(inputs.get("attention_mask"), torch.Tensor):
            box["batch_tokens"].append(int(inputs["attention_mask"].sum()))
        return original_step(self, model, inputs, *args, **kwargs)

    Trainer.train = train
    Trainer.training_step = training_step
    try:
        from trl import GRPOTrainer
    except ImportError:
        return
    original_gen = GRPOTrainer._generate_and_score_completions

    def generate(self: Any, inputs: Any) -> Any:
        out = original_gen(self, inputs)
        if self.model.training:
            box["groups"].append({"prompt": int(out["prompt_mask"].sum()),
                                  "completion": int(out["completion_mask"].sum()),
                                  "completion_shape": list(out["completion_ids"].shape)})
        return out

    GRPOTrainer._generate_and_score_completions = generate


def trl_grpo(model: str, data: str, out: str, targets: str, steps: int) -> None:
    """TRL's GRPOTrainer used plainly: TRL loads the model, LoRA through peft_config; nothing of gemma4_tune."""
    import importlib.util

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("rewards", Path(data).parent / "rewards.py")
    rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rewards)
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=BATCH_SIZE, learning_rate=LR, max_steps=steps,
                      beta=BETA, num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION,
                      temperature=1.0, loss_type="dapo", bf16=False, use_cpu=True, logging_steps=1,
                      save_strategy="no", report_to=[], disable_tqdm=True, seed=SEED, activation_checkpointing=True,
                      log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[rewards.length], args=args,
                          train_dataset=load_dataset("json", data_files=data, split="train"),
                          processing_class=AutoProcessor.from_pretrained(model),
                          peft_config=LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=json.loads(
                              Path(targets).read_text())))
    trainer.train()


def child(argv: list[str]) -> None:
    side, stats = argv[0], Path(argv[1])
    install_meters(stats)
    if side == "ours":
        sys.argv = ["gemma4-tune", "train", argv[2]]
        try:
            runpy.run_module("gemma4_tune", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code:
                raise
    elif side == "trl_dpo":
        model, data, out, targets, steps = argv[2:7]
        sys.argv = ["trl_dpo_baseline.py", model, data, out, targets, "--batch-size", str(BATCH_SIZE), "--max-len",
                    str(MAX_LEN), "--rank", str(RANK), "--lr", str(LR), "--beta", str(BETA)]
        # the baseline trains one epoch; rows = steps * batch, so it trains `steps` steps
        runpy.run_path(str(common.BENCH / "trl_dpo_baseline.py"), run_name="__main__")
    elif side == "trl_grpo":
        model, data, out, targets, steps = argv[2:7]
        trl_grpo(model, data, out, targets, int(steps))


# ------------------------------------------------------------------------------------------ parent
def run_side(side: str, model: Path, root: Path, out: Path, targets: Path, steps: int) -> dict[str, Any]:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    stats = out / "stats.json"
    me = [sys.executable, str(Path(__file__).resolve()), "_child"]
    if side in ("sft", "dpo", "grpo"):
        settings: dict[str, Any] = {"model": str(model), "out": str(out / "run"), "batch_size": BATCH_SIZE,
                                    "max_seq_len": MAX_LEN, "rank": RANK, "lr": LR, "epochs": 1, "max_steps": steps,
                                    "save_steps": 100_000, "preflight": False, "seed": SEED, "samples": 0}
        if side == "sft":
            settings["data"] = str(root / "sft.jsonl")
        elif side == "dpo":
            settings.update(data=str(root / "pairs.jsonl"), method="dpo", beta=BETA)
        else:
            settings.update(data=str(root / "prompts.jsonl"), method="grpo", beta=BETA,
                            rewards=[f"{root / 'rewards.py'}:length"], num_generations=NUM_GENERATIONS,
                            max_completion_length=MAX_COMPLETION, temperature=1.0, loss_type="dapo")
        run_file = out / "run.yaml"
        run_file.write_text(yaml.safe_dump(settings))
        cmd = [*me, "ours", str(stats), str(run_file)]
    else:
        data = root / ("pairs.jsonl" if side == "trl_dpo" else "prompts.jsonl")
        cmd = [*me, side, str(stats), str(model), str(data), str(out / "run"), str(targets), str(steps)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = round(time.perf_counter() - started, 1)
    (out / "stderr.txt").write_text(proc.stderr)
    if proc.returncode or not stats.exists():
        raise RuntimeError(f"{side} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(stats.read_text())
    result.pop("batch_tokens", None)
    result["wall_seconds"] = wall
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in runs)
    seconds = sum(r["loop_seconds"] for r in runs)
    return {"tokens_per_s": round(tokens / seconds, 2), "tokens": [r["tokens"] for r in runs],
            "loop_seconds": [r["loop_seconds"] for r in runs],
            "step_seconds_median": round(common.median([s for r in runs for s in r["step_seconds"]]), 2),
            "peak_above_weights_mb": max(r["peak_above_weights_mb"] for r in runs),
            "runs_peak_above_weights_mb": [r["peak_above_weights_mb"] for r in runs],
            "rss_mb_at_train_begin": max(r["rss_mb_at_train_begin"] for r in runs),
            "loop_peak_rss_mb": max(r["loop_peak_rss_mb"] for r in runs),
            "steps": [r["steps"] for r in runs], "wall_seconds": [r["wall_seconds"] for r in runs],
            "first_loss": sorted({r.get("first_loss") for r in runs if r.get("first_loss") is not None}),
            "trainable_parameters": sorted({r["trainable_parameters"] for r in runs})}


def profile_dpo(model: Path, root: Path, out: Path) -> dict[str, Any]:
    """One `train --method dpo` step (in a fresh process) under torch.profiler: top ops by CPU time and memory."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(model), "out": str(out / "run"), "batch_size": BATCH_SIZE, "max_seq_len": MAX_LEN,
                "rank": RANK, "lr": LR, "epochs": 1, "max_steps": 1, "save_steps": 100_000, "preflight": False,
                "seed": SEED, "samples": 0, "data": str(root / "pairs.jsonl"), "method": "dpo", "beta": BETA}
    (out / "run.yaml").write_text(yaml.safe_dump(settings))
    target = out / "profile.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_profile", str(out / "run.yaml"),
                           str(target)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"profile failed:\n{proc.stderr[-4000:]}")
    return json.loads(target.read_text())


def profile_child(run_file: str, target: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=False) as prof:
            result = original(self, *args, **kwargs)
        seconds = time.perf_counter() - started
        ev = prof.key_averages(group_by_input_shape=True)
        total_self = sum(e.self_cpu_time_total for e in ev)
        by_time = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        by_mem = sorted(ev, key=lambda e: e.self_cpu_memory_usage, reverse=True)[:10]
        plain = prof.key_averages()
        names = ("ChunkedLogProbFunction", "_ChunkedLogProbFunction", "aten::mm", "aten::addmm", "aten::addmm_")
        Path(target).write_text(json.dumps({
            "step_seconds_profiled": round(seconds, 2), "self_cpu_seconds_all_ops": round(total_self / 1e6, 2),
            "by_self_cpu_time": [{"op": e.key, "shapes": [s for s in e.input_shapes if s][:3], "calls": e.count,
                                  "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2),
                                  "share": round(e.self_cpu_time_total / total_self, 3)} for e in by_time],
            "by_self_memory": [{"op": e.key, "shapes": [s for s in e.input_shapes if s][:3], "calls": e.count,
                                "self_allocated_mb": round(e.self_cpu_memory_usage / 2**20, 1)} for e in by_mem],
            "autograd_functions": [{"op": e.key, "calls": e.count, "cpu_total_s": round(e.cpu_time_total / 1e6, 2)}
                                   for e in plain if any(n in e.key for n in names)]}, indent=1))
        return result

    Trainer.training_step = training_step
    _ = torch
    sys.argv = ["gemma4-tune", "train", run_file]
    try:
        runpy.run_module("gemma4_tune", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_profile":
        profile_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--model-dir", type=Path, help="reuse (or build there) the real-vocabulary model")
    ap.add_argument("--sides", default=",".join(ORDER))
    ap.add_argument("--profile-dpo", action="store_true")
    ap.add_argument("--once", action="store_true", help="each side once (a smoke test), not A B .. B A")
    ap.add_argument("--work", type=Path, help="work directory (default: a temp dir)")
    a = ap.parse_args()
    import real_vocab

    from gemma4_tune.api import plan

    started = common.machine()
    sides = tuple(s for s in a.sides.split(",") if s)
    work = a.work or Path(tempfile.mkdtemp(prefix="g4t-bench-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    model = a.model_dir or work / "model"
    if not (model / "config.json").exists():
        real_vocab.build_model(model)
    data = make_data(work, a.steps * BATCH_SIZE, a.prompt_words)
    targets = work / "targets.json"
    targets.write_text(json.dumps(plan(str(model), "text", rank=RANK)[1].target_modules))
    order = [*sides] if a.once else [*sides, *reversed(sides)]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i, side in enumerate(order):
        r = run_side(side, model, work, work / f"{i}-{side}", targets, a.steps)
        runs[side].append(r)
        print(f"{side}: {r['steps']} steps, {r['tokens']} tokens in {r['loop_seconds']} s "
              f"({r['tokens_per_s']} tok/s), peak above weights {r['peak_above_weights_mb']} MB "
              f"(RSS at train begin {r['rss_mb_at_train_begin']} MB), wall {r['wall_seconds']} s", flush=True)
    figures = {s: aggregate(rs) for s, rs in runs.items()}
    ratios: dict[str, float] = {}
    same: dict[str, Any] = {}

    def ratio(a_: str, b_: str) -> None:
        if a_ in figures and b_ in figures:
            fa, fb = figures[a_], figures[b_]
            ratios[f"{a_}/{b_} tokens_per_s"] = round(fa["tokens_per_s"] / fb["tokens_per_s"], 3)
            ratios[f"{a_}/{b_} step_seconds"] = round(fa["step_seconds_median"] / fb["step_seconds_median"], 3)
            ratios[f"{a_}/{b_} peak_above_weights"] = round(fa["peak_above_weights_mb"]
                                                            / max(fb["peak_above_weights_mb"], 1.0), 3)

    ratio("dpo", "trl_dpo")
    ratio("dpo", "sft")
    ratio("trl_dpo", "sft")
    ratio("grpo", "trl_grpo")
    if "dpo" in runs and "trl_dpo" in runs:
        same["dpo"] = {"steps": [figures["dpo"]["steps"], figures["trl_dpo"]["steps"]],
                       "tokens": [figures["dpo"]["tokens"], figures["trl_dpo"]["tokens"]],
                       "trainable_parameters": [figures["dpo"]["trainable_parameters"],
                                                figures["trl_dpo"]["trainable_parameters"]],
                       "first_loss": [figures["dpo"]["first_loss"], figures["trl_dpo"]["first_loss"]]}
        same["dpo"]["same"] = (set(figures["dpo"]["steps"]) == set(figures["trl_dpo"]["steps"]) == {a.steps}
                               and figures["dpo"]["tokens"] == figures["trl_dpo"]["tokens"])
    if "grpo" in runs and "trl_grpo" in runs:
        per = {s: [[g["completion"] for g in r["groups"]] for r in runs[s]] for s in ("grpo", "trl_grpo")}
        shapes = {s: sorted({tuple(g["completion_shape"]) for r in runs[s] for g in r["groups"]})
                  for s in ("grpo", "trl_grpo")}
        same["grpo"] = {"steps": [figures["grpo"]["steps"], figures["trl_grpo"]["steps"]],
                        "completion_tokens_per_step": per, "completion_shapes": shapes,
                        "prompt_tokens_per_step": {s: [[g["prompt"] for g in r["groups"]] for r in runs[s]]
                                                   for s in ("grpo", "trl_grpo")},
                        "trainable_parameters": [figures["grpo"]["trainable_parameters"],
                                                 figures["trl_grpo"]["trainable_parameters"]]}
        same["grpo"]["same"] = (set(figures["grpo"]["steps"]) == set(figures["trl_grpo"]["steps"]) == {a.steps}
                                and per["grpo"] == per["trl_grpo"])
    payload: dict[str, Any] = {
        "what": "SFT vs DPO vs TRL DPOTrainer, and GRPO vs TRL GRPOTrainer, at Gemma 4's real vocabulary (262,144): "
                "peak RSS above the loaded weights and tokens/s over the training loop",
        "model": common.model_shape(model), "data": data,
        "settings": {"batch_size": BATCH_SIZE, "steps": a.steps, "rank": RANK, "lr": LR, "beta": BETA,
                     "num_generations": NUM_GENERATIONS, "max_completion_length": MAX_COMPLETION,
                     "max_len": MAX_LEN, "dtype": "float32", "device": "cpu", "order": order,
                     "peak_memory": "VmHWM at the end of Trainer.train minus VmRSS at its start (peak reset there), after every "
                                    "page of the memory-mapped weights was read (so the weights count as loaded)",
                     "tokens": "SFT/DPO: attention mask of each training batch (DPO: [chosen; rejected]); GRPO: "
                               "prompt + completion masks of each generated group"},
        "figures": figures, "ratios": ratios, "work_checked": same, "runs": runs}
    if a.profile_dpo:
        payload["dpo_profile"] = profile_dpo(model, work, work / "profile")
    path = common.write_result("methods_real_vocab", started, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
