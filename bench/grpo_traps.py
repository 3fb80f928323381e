"""The GRPO traps of TRL's ``GRPOTrainer`` used plainly on tiny Gemma 4 models, on the CPU ("before" figures).

Plain use: ``GRPOTrainer(model=peft_model, processing_class=AutoProcessor(tiny dir), reward_funcs=[python fn],
args=GRPOConfig(use_cpu=True, bf16=False, num_generations=4, per_device_train_batch_size=4,
max_completion_length=16, max_steps=2, ...))`` with conversational prompts of different lengths; the LoRA model
is gemma4-tune's (``load_model`` + ``prepare_model``). Nothing in TRL is patched: a subclass only records the
output of ``_generate_and_score_completions`` and re-scores that batch for the comparisons.

1. padding inside the prompt: pad ids that ``prompt_mask`` marks as real, in the first batch (E2B and 31B,
   beta 0.04 and 0.0; also with 8 rows per batch = 2 distinct prompts, since 4 rows with num_generations=4 are one
   prompt repeated); grad norm of step 1; whether step 2 crashes; how far the completion log-probs move
   when the pads are masked out.
2. images on the 31B: shapes of ``mm_token_type_ids`` vs ``prompt_ids``/``input_ids``, offset between the
   ``<|image|>`` positions and ``mm_token_type_ids == 1``, completion log-prob change with aligned ids.
3. thinking: the string a reward function receives when the completion has a thought channel.
4. constant reward: loss, grad_norm and frac_reward_zero_std of the first 2 steps; whether TRL warns.

Run: ``.venv/bin/python bench/grpo_traps.py [--out bench/results/grpo_traps.json] [--work /tmp/grpo_traps]``.
Builds the tiny models with ``gemma4-tune tiny-model`` into ``WORK/e2b`` and ``WORK/31b`` if missing; prints one
JSON object and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

TEXTS = ["Hi", "What is 2+2?", "Name three colours of the rainbow, please.",
         "Write one short sentence about cats, dogs and the long summer afternoons they share.",
         "Yes?", "Count to five.", "Why is the sky blue during the day but red at sunset, briefly?", "Ok"]
THOUGHT = "<|channel>thought\nThe user asks 2+2; secret plan: say 4.<channel|>The answer is 4.<turn|>"


# ---------------------------------------------------------------------------------------------------- helpers
def tiny_dir(work: Path, variant: str) -> Path:
    out = work / variant
    if not (out / "config.json").exists():
        if out.exists():
            shutil.rmtree(out)
        exe = Path(sys.executable).with_name("gemma4-tune")
        subprocess.run([str(exe), "tiny-model", "--variant", variant, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def load_peft(path: Path) -> Any:
    from gemma4_tune.plan.adapters import prepare_model
    from gemma4_tune.train.base import load_model

    model, _processor, _ = load_model(str(path))
    peft_model, _plan = prepare_model(model)
    return peft_model


class Recorder(logging.Handler):
    """Every warning TRL/transformers log during a run, plus Python warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip().replace("\n", " ")[:240]
        if msg not in self.messages:
            self.messages.append(msg)


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def make_trainer_class():
    from trl import GRPOTrainer

    class Probe(GRPOTrainer):
        """GRPOTrainer unchanged; records the first scored batch and runs ``self.probe_fn`` on it."""

        captured: list[dict[str, Any]]
        probe_fn = None
        probe_result: dict[str, Any] | None = None

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not self.captured:
                self.captured.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                      for k, v in out.items()})
                if self.probe_fn is not None:
                    try:
                        self.probe_result = self.probe_fn(self, out)
                    except Exception as exc:  # noqa: BLE001 - a figure, not a failure of the script
                        self.probe_result = {"probe_error": short(exc)}
            return out

    return Probe


def run_grpo(model_dir: Path, dataset: Any, reward, *, beta: float, batch: int = 4, steps: int = 2,
             probe_fn=None, rollout_func=None, chat_template_kwargs: dict | None = None,
             tag: str = "run") -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoProcessor, set_seed
    from trl import GRPOConfig

    set_seed(0)
    rec = Recorder()
    loggers = [logging.getLogger(n) for n in ("trl", "transformers", "peft", "accelerate")]
    for lg in loggers:
        lg.addHandler(rec)
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = load_peft(model_dir)
            processor = AutoProcessor.from_pretrained(str(model_dir))
            args = GRPOConfig(output_dir=f"/tmp/grpo_traps/out/{tag}", use_cpu=True, bf16=False, num_generations=4,
                              per_device_train_batch_size=batch, max_completion_length=16, max_steps=steps,
                              logging_steps=1, report_to=[], beta=beta, save_strategy="no", disable_tqdm=True,
                              seed=0, **({"chat_template_kwargs": chat_template_kwargs}
                                         if chat_template_kwargs else {}))
            trainer = make_trainer_class()(model=model, processing_class=processor, reward_funcs=[reward],
                                           args=args, train_dataset=dataset if not isinstance(dataset, list)
                                           else Dataset.from_list(dataset), rollout_func=rollout_func)
            trainer.captured = []
            trainer.probe_fn = probe_fn
            result["eos_token_ids"] = list(trainer.eos_token_ids)
            result["generation_config_eos"] = model.generation_config.eos_token_id
            try:
                trainer.train()
                result["crash"] = None
            except Exception as exc:  # noqa: BLE001
                result["crash"] = short(exc)
                result["crash_at_step"] = trainer.state.global_step + 1
                result["crash_where"] = traceback.extract_tb(exc.__traceback__)[-1].name
            logs = [h for h in trainer.state.log_history if "loss" in h]
            result["steps_done"] = len(logs)
            result["logs"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items()
                               if k in ("step", "loss", "grad_norm", "frac_reward_zero_std", "reward",
                                        "reward_std", "kl", "completions/mean_length")} for h in logs]
            result["captured"] = trainer.captured[0] if trainer.captured else None
            result["probe"] = trainer.probe_result
        except Exception as exc:  # noqa: BLE001
            result["setup_error"] = short(exc)
    for lg in loggers:
        lg.removeHandler(rec)
    pywarn = [f"{w.category.__name__}: {str(w.message).strip()[:200]}" for w in caught]
    result["warnings"] = list(dict.fromkeys(rec.messages + pywarn))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def completion_logps(trainer, out: dict, attention_mask=None, **override) -> torch.Tensor:
    """Completion log-probs of the policy for the scored batch, the way TRL computes them (same kwargs)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mask = attention_mask if attention_mask is not None else torch.cat([out["prompt_mask"],
                                                                         out["completion_mask"]], dim=1)
    kwargs = {k: out[k] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids", "num_images")
              if k in out}
    kwargs.update(override)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                 out["completion_ids"].size(1), **kwargs)
    return logps


def max_shift(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return round(float(((a - b).abs() * mask).max()), 6)


# ---------------------------------------------------------------------------------------------------- traps
def reward_len(completions, **_):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def text_rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": t}]} for t in TEXTS]


def probe_padding(trainer, out) -> dict[str, Any]:
    pad = trainer._tokenizer.pad_token_id
    ids, pmask = out["prompt_ids"], out["prompt_mask"]
    inside = (ids == pad) & (pmask == 1)
    fixed_mask = torch.cat([(ids != pad).long(), out["completion_mask"]], dim=1)
    cmask = out["completion_mask"].float()
    trl = completion_logps(trainer, out)
    fixed = completion_logps(trainer, out, attention_mask=fixed_mask)
    rows = ids.size(0)
    return {"prompt_ids_shape": list(ids.shape), "distinct_prompts": len({tuple(r.tolist()) for r in ids}),
            "pad_id": pad, "pads_marked_real": int(inside.sum()), "rows_with_pads_marked_real":
            int(inside.any(dim=1).sum()), "pads_marked_real_per_row": inside.sum(dim=1).tolist(),
            "rows": rows, "logp_shift_vs_pads_masked_max_abs": max_shift(trl, fixed, cmask)}


def trap_padding(work: Path) -> dict[str, Any]:
    res = {}
    for variant in ("e2b", "31b"):
        for batch, beta in ((4, 0.04), (4, 0.0), (8, 0.04), (8, 0.0)):
            r = run_grpo(tiny_dir(work, variant), text_rows(), reward_len, beta=beta, batch=batch,
                         probe_fn=probe_padding, tag=f"pad-{variant}-{batch}-{beta}")
            res[f"{variant}/batch{batch}/beta{beta}"] = {
                **(r.get("probe") or {}),
                "grad_norm_step1": r["logs"][0].get("grad_norm") if r.get("logs") else None,
                "loss_step1": r["logs"][0].get("loss") if r.get("logs") else None,
                "steps_done": r.get("steps_done"), "crash": r.get("crash") or r.get("setup_error"),
                "crash_at_step": r.get("crash_at_step"), "crash_where": r.get("crash_where"),
                "seconds": r["seconds"]}
    return res


def probe_images(trainer, out) -> dict[str, Any]:
    tok = trainer._tokenizer
    image_id = tok.convert_tokens_to_ids("<|image|>")
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    mm = out.get("mm_token_type_ids")
    res: dict[str, Any] = {"image_token_id": image_id, "prompt_ids_shape": list(out["prompt_ids"].shape),
                           "completion_ids_shape": list(out["completion_ids"].shape),
                           "input_ids_shape": list(ids.shape), "keys": sorted(out.keys()),
                           "pixel_values_shape": list(out["pixel_values"].shape) if "pixel_values" in out else None,
                           "mm_token_type_ids_shape": list(mm.shape) if mm is not None else None,
                           "bos_per_row": (out["prompt_ids"] == tok.bos_token_id).sum(dim=1).tolist(),
                           "pads_marked_real": int(((out["prompt_ids"] == tok.pad_token_id)
                                                    & (out["prompt_mask"] == 1)).sum())}
    if mm is None:
        return res
    n = min(mm.size(1), ids.size(1))
    offsets, mismatched = [], []
    for r in range(ids.size(0)):
        img = (ids[r] == image_id).nonzero().flatten()
        typ = (mm[r] == 1).nonzero().flatten()
        offsets.append(int(typ[0] - img[0]) if len(img) and len(typ) else None)
        mismatched.append(int(((ids[r, :n] == image_id) != (mm[r, :n] == 1)).sum()))
    res.update({"image_tokens_per_row": (ids == image_id).sum(dim=1).tolist(),
                "mm_type1_per_row": (mm == 1).sum(dim=1).tolist(),
                "offset_first_mm1_minus_first_image_token": offsets,
                "positions_disagreeing_per_row": mismatched})
    aligned = (ids == image_id).long()
    cmask = out["completion_mask"].float()
    try:
        trl = completion_logps(trainer, out)
        res["trl_forward"] = "ok"
    except Exception as exc:  # noqa: BLE001
        trl, res["trl_forward"] = None, short(exc)
    fixed = completion_logps(trainer, out, mm_token_type_ids=aligned)
    fixed_pads = completion_logps(trainer, out, mm_token_type_ids=aligned, attention_mask=torch.cat(
        [(out["prompt_ids"] != tok.pad_token_id).long(), out["completion_mask"]], dim=1))
    if trl is not None:
        res["logp_shift_trl_vs_aligned_mm_max_abs"] = max_shift(trl, fixed, cmask)
        res["logp_shift_trl_vs_aligned_mm_and_pads_masked_max_abs"] = max_shift(trl, fixed_pads, cmask)
    return res


def trap_images(work: Path) -> dict[str, Any]:
    from PIL import Image

    rows = []
    for i, t in enumerate(TEXTS):
        img = Image.new("RGB", (32 + 16 * (i % 3), 32), (40 * i % 255, 90, 200))
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                     "images": [img]})
    res = {}
    for batch in (4, 8):
        r = run_grpo(tiny_dir(work, "31b"), rows, reward_len, beta=0.04, batch=batch, probe_fn=probe_images,
                     tag=f"img-{batch}")
        res[f"31b/batch{batch}/beta0.04"] = {**(r.get("probe") or {}), "steps_done": r.get("steps_done"),
                                             "grad_norm_step1": r["logs"][0].get("grad_norm") if r.get("logs")
                                             else None, "crash": r.get("crash") or r.get("setup_error"),
                                             "crash_at_step": r.get("crash_at_step"),
                                             "crash_where": r.get("crash_where"), "seconds": r["seconds"]}
    return res


def trap_thinking(work: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reward_record(prompts, completions, completion_ids, **_):
        if "completion" not in seen:
            seen["completion"] = completions[0]
            seen["completion_ids"] = list(completion_ids[0])
        return [1.0 if "4" in c[0]["content"] else 0.0 for c in completions]

    def rollout(prompts, trainer):
        proc, tok = trainer.processing_class, trainer._tokenizer
        prompt_ids = [proc.apply_chat_template([p], add_generation_prompt=True, tokenize=True, return_dict=True,
                                               **trainer.chat_template_kwargs)["input_ids"][0] for p in prompts]
        seen.setdefault("rendered_prompt", tok.decode(prompt_ids[0]))
        done = tok.encode(THOUGHT, add_special_tokens=False)
        return {"prompt_ids": prompt_ids, "completion_ids": [list(done) for _ in prompts], "logprobs": None}

    model_dir = tiny_dir(work, "31b")
    r = run_grpo(model_dir, text_rows(), reward_record, beta=0.0, steps=1, rollout_func=rollout,
                 chat_template_kwargs={"enable_thinking": True}, tag="think")
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(str(model_dir)).tokenizer
    thought_ids = tok.encode(THOUGHT, add_special_tokens=False)
    # the ordinary generation path, thinking on: what TRL renders and what the reward sees from sampled ids
    seen_plain: dict[str, Any] = {}

    def reward_plain(prompts, completions, **_):
        seen_plain.setdefault("completion", completions[0])
        return [0.0] * len(completions)

    def probe(trainer, out):
        return {"rendered_prompt": trainer._tokenizer.decode(out["prompt_ids"][0][out["prompt_mask"][0] == 1])}

    r2 = run_grpo(model_dir, text_rows(), reward_plain, beta=0.0, steps=1, probe_fn=probe,
                  chat_template_kwargs={"enable_thinking": True}, tag="think-plain")
    return {"completion_text_built": THOUGHT,
            "completion_token_ids": thought_ids,
            "single_token": {t: len(tok.encode(t, add_special_tokens=False)) == 1
                             for t in ("<|channel>", "<channel|>", "<turn|>")},
            "tokenizer_has_response_schema": getattr(tok, "response_schema", None) is not None,
            "reward_received": seen.get("completion"), "rendered_prompt_rollout": seen.get("rendered_prompt"),
            "rollout_run_crash": r.get("crash") or r.get("setup_error"), "rollout_steps_done": r.get("steps_done"),
            "generate_path_rendered_prompt": (r2.get("probe") or {}).get("rendered_prompt"),
            "generate_path_reward_received": seen_plain.get("completion"),
            "generate_path_crash": r2.get("crash") or r2.get("setup_error"),
            "seconds": round(r["seconds"] + r2["seconds"], 1)}


def trap_constant(work: Path) -> dict[str, Any]:
    def reward_one(completions, **_):
        return [1.0] * len(completions)

    res = {}
    for beta in (0.04, 0.0):
        r = run_grpo(tiny_dir(work, "31b"), text_rows(), reward_one, beta=beta, tag=f"const-{beta}")
        relevant = [w for w in r["warnings"] if any(s in w.lower() for s in ("std", "reward", "advantage", "signal"))]
        res[f"31b/batch4/beta{beta}"] = {"logs": r.get("logs"), "crash": r.get("crash") or r.get("setup_error"),
                                         "trl_warned_about_constant_reward": bool(relevant),
                                         "relevant_warnings": relevant, "seconds": r["seconds"]}
    return res


def facts(work: Path) -> dict[str, Any]:
    from transformers import AutoProcessor, GenerationConfig

    res = {}
    for variant in ("e2b", "31b"):
        d = tiny_dir(work, variant)
        proc = AutoProcessor.from_pretrained(str(d))
        tok = proc.tokenizer
        batched = proc.apply_chat_template([r["prompt"] for r in text_rows()[:2]], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)
        res[variant] = {
            "processor": type(proc).__name__, "tokenizer_padding_side": tok.padding_side,
            "pad": [tok.pad_token, tok.pad_token_id], "eos": [tok.eos_token, tok.eos_token_id],
            "turn_end_id": tok.convert_tokens_to_ids("<turn|>"),
            "generation_config_eos_token_id": GenerationConfig.from_pretrained(str(d)).eos_token_id,
            "apply_chat_template_batched_keys": sorted(batched.keys()),
            "apply_chat_template_batched_lengths": [len(x) for x in batched["input_ids"]],
            "apply_chat_template_pads_by_default": len({len(x) for x in batched["input_ids"]}) == 1,
            "bos_in_rendered_prompt": batched["input_ids"][0].count(tok.bos_token_id)}
        if variant == "31b":  # what TRL's forward-kwargs call does: processor(text=rendered template, images=...)
            from PIL import Image

            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            enc = proc(text=[text], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")
            res[variant]["processor_call_on_rendered_text"] = {
                "text_starts_with_bos": text.startswith(tok.bos_token),
                "bos_in_input_ids": int((enc["input_ids"][0] == tok.bos_token_id).sum()),
                "keys": sorted(enc.keys())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/grpo_traps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_traps.json"))
    ap.add_argument("--only", nargs="*", help="run only these traps (padding images thinking constant_reward)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import transformers
    import trl

    t0 = time.perf_counter()
    result: dict[str, Any] = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                           "torch": torch.__version__}, "facts": facts(work)}
    for name, fn in (("padding", trap_padding), ("images", trap_images), ("thinking", trap_thinking),
                     ("constant_reward", trap_constant)):
        if a.only and name not in a.only:
            continue
        try:
            result[name] = fn(work)
        except Exception as exc:  # noqa: BLE001
            result[name] = {"error": short(exc)}
    result["seconds_total"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1, default=str)
    Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
