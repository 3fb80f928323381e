"""GRPO on TRL 1.16's GRPOTrainer with gemma4-tune's model preparation and exact Gemma 4 rendering.

TRL used plainly on Gemma 4 trains something other than what it says (issue 33); :class:`Gemma4GRPOTrainer` changes
three of its steps, each proven by preflight on a real generation group and by tests:

- **Prompts are rendered by us**, one at a time and unpadded (``Gemma4Batcher.encode_generation``: the official
  template with ``add_generation_prompt`` and the thinking flag, ``<bos>`` once, the thought switch once). TRL calls
  the processor on the batch, which pads by default, keeps the pad ids and sets the prompt mask to ones over them
  (bench/grpo_traps.py, two prompts per batch: 4 pad tokens inside the tiny E2B's first prompt mask; on the tiny 31B
  the first gradient norm is NaN and the second step's sampling crashes).
- **``mm_token_type_ids`` are rebuilt from the ids the model gets** (``processor.create_mm_token_type_ids``) before
  every log-probability forward: TRL re-tokenises text that already has ``<bos>``, so its ids are one longer than
  ``input_ids`` and off by one against ``<|image|>``, which moves completion log-probs on bidirectional models.
- **Rewards see the answer without the thought channel** (``train.rewards.Reward``): TRL decodes with
  ``skip_special_tokens`` and hands ``'thought...answer'`` to the reward.

Generation stops at ``<turn|>`` (added to the stop ids), and the reference is the base with the adapter disabled:
handed a PeftModel with ``beta > 0``, TRL copies the adapter into a second one named ``ref``, deleted here as for DPO.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from trl import GRPOTrainer

from gemma4_tune.data.chat import END_OF_TURN
from gemma4_tune.findings import Finding, Severity, finding, register
from gemma4_tune.io import figure_text
from gemma4_tune.preflight import LOSS_NOT_FINITE
from gemma4_tune.train.base import trl_messages
from gemma4_tune.train.callbacks import GuardCallback
from gemma4_tune.train.rewards import THOUGHT_CLOSE, THOUGHT_OPEN, Reward, read_completion

PAD_IN_PROMPT = register("G4T520", Severity.ERROR, "GRPO prompts carry padding inside their attention mask")
MM_TYPES_MISALIGNED = register("G4T521", Severity.ERROR, "GRPO mm_token_type_ids do not line up with the image tokens",
                               (10,))
REWARDS_CONSTANT = register("G4T522", Severity.WARNING, "GRPO rewards are equal within every group of the first "
                            "generation")
NO_TURN_ENDS = register("G4T523", Severity.WARNING, "No GRPO completion ends its turn")
THOUGHT_IN_ANSWER = register("G4T524", Severity.WARNING, "Thought-channel text left in GRPO answers")
THINKING_SWITCH = register("G4T525", Severity.ERROR, "GRPO prompts render the thinking switch other than once")
GRPO_REFERENCE = register("G4T526", Severity.ERROR, "GRPO reference model is not the base model")
GRPO_NOT_LEARNING = register("G4T527", Severity.WARNING, "GRPO did not raise the held-out reward")
ZERO_SPREAD = register("G4T421", Severity.ERROR, "GRPO rewards had no spread within any group for several steps")
ALL_CLIPPED = register("G4T422", Severity.WARNING, "Every GRPO completion was cut at the length limit for several "
                       "steps")
KL_STUCK = register("G4T423", Severity.WARNING, "GRPO KL to the reference stayed at 0 for several steps")

#: Logged steps in a row before a GRPO guard stops the run.
GUARD_STEPS = 3
THINK_TOKEN = "<|think|>"


def prompt_key(prompt: list[dict]) -> str:
    """The identity of a TRL prompt row (what :class:`Gemma4GRPOTrainer` finds our messages by)."""
    return json.dumps(prompt, sort_keys=True, default=str)


def trl_dataset(prompts: Sequence[Any]) -> Any:
    """Prompts as TRL's prompt-only conversational dataset; every reward column as a column."""
    from datasets import Dataset

    names = sorted({k for p in prompts for k in p.columns})
    rows: dict[str, list[Any]] = {"prompt": [trl_messages(p.messages) for p in prompts]}
    for name in names:
        rows[name] = [p.columns.get(name) for p in prompts]
    return Dataset.from_dict(rows)


class Gemma4GRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with Gemma 4's prompts rendered by gemma4-tune, aligned ``mm_token_type_ids`` and rewards
    that see the answer without its thought channel (module docstring)."""

    def __init__(self, *args: Any, batcher: Any, prompts: Sequence[Any], counter: Any = None, **kwargs: Any) -> None:
        self.batcher = batcher
        self.prompt_messages = {prompt_key(trl_messages(p.messages)): p for p in prompts}
        self.counter = counter
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], list[Any] | None, dict[str, Any]]:
        ids: list[list[int]] = []
        images: list[Any] = []
        fields: dict[str, list[Any]] = {}
        for prompt in prompts:
            row = self.prompt_messages[prompt_key(prompt)]
            inputs, loaded = self.batcher.encode_generation(row.messages, source=row.source)
            ids.append(inputs["input_ids"][0].tolist())
            images.append(loaded)  # [] for a text prompt: the processor takes mixed batches so, not None
            for key, value in inputs.items():
                if key in ("input_ids", "attention_mask"):
                    continue
                if value.ndim == 2 and value.shape == inputs["input_ids"].shape:
                    fields.setdefault(key, []).append(value[0].tolist())  # per token: TRL pads it like the ids
                else:
                    fields.setdefault(key, []).append(value)
        merged = {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else v for k, v in fields.items()}
        return ids, (images if any(images) else None), merged

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                           logits_to_keep: int, batch_size: int | None = None,
                                           compute_entropy: bool = False, compute_aux_loss: bool = False,
                                           **kwargs: Any) -> Any:
        """TRL's, on aligned ``mm_token_type_ids``, chunk by chunk so that a chunk of text prompts in a mixed batch
        gets no (empty) pixel tensor: TRL slices ``pixel_values`` to zero images there and the vision tower fails."""
        if kwargs.get("mm_token_type_ids") is not None or kwargs.get("pixel_values") is not None:
            kwargs["mm_token_type_ids"] = aligned_token_types(self.processing_class, input_ids)
        num_images = kwargs.get("num_images")
        size = batch_size or input_ids.size(0)
        if num_images is None or kwargs.get("pixel_values") is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, size,
                                                              compute_entropy, compute_aux_loss, **kwargs)
        per_image = ("pixel_values", "image_position_ids")
        first_image = [0, *torch.tensor(num_images).cumsum(0).tolist()]
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), size):
            end = min(start + size, input_ids.size(0))
            chunk = {k: (v[start:end] if torch.is_tensor(v) and v.size(0) == input_ids.size(0) else v)
                     for k, v in kwargs.items() if k not in (*per_image, "num_images")}
            if first_image[end] > first_image[start]:
                chunk.update({k: kwargs[k][first_image[start]:first_image[end]] for k in per_image
                              if kwargs.get(k) is not None})
                chunk["num_images"] = list(num_images[start:end])
            out = super()._get_per_token_logps_and_entropies(model, input_ids[start:end], attention_mask[start:end],
                                                             logits_to_keep, end - start, compute_entropy,
                                                             compute_aux_loss, **chunk)
            logps.append(out[0])
            entropies.append(out[1])
            aux.append(out[2])
        return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if output.get("mm_token_type_ids") is not None:
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            output["mm_token_type_ids"] = aligned_token_types(self.processing_class, ids)
        if self.counter is not None:
            self.counter.add(int(output["prompt_mask"].sum() + output["completion_mask"].sum()))
        return output


def aligned_token_types(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` for exactly these ids (image tokens 1, video 2, else 0), from the processor's own rule."""
    types = processor.create_mm_token_type_ids(input_ids.tolist())
    return torch.tensor(types, dtype=torch.long, device=input_ids.device)


def stop_at_end_of_turn(model: Any, tokenizer: Any) -> list[int]:
    """Make sure ``<turn|>`` is among the model's generation stop ids (a checkpoint whose generation_config lists
    ``<eos>`` only would otherwise write past the end of its turn); return them."""
    turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    config = model.generation_config
    ids = config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if turn not in ids:
        config.eos_token_id = [*ids, turn]
    return list(config.eos_token_id)


def generation_settings(*, cuda: bool, vllm: bool) -> dict[str, Any]:
    """Where rollouts are generated: TRL's colocated vLLM (in this process, sharing the GPU) on CUDA where vLLM is
    installed, else transformers' ``generate`` (the CPU, or CUDA without vLLM)."""
    if cuda and vllm:
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3,
                "vllm_enable_sleep_mode": True}
    return {"use_vllm": False}


def grpo_config(cfg: Any, staging: Path, settings: dict[str, Any]) -> Any:
    """TRL's GRPOConfig for a RunConfig: our Trainer settings and the GRPO ones, fp32 on CPU."""
    import importlib.util

    from trl import GRPOConfig

    backend = generation_settings(cuda=torch.cuda.is_available(), vllm=importlib.util.find_spec("vllm") is not None)
    return GRPOConfig(**settings, **backend, beta=cfg.beta, num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      loss_type=cfg.loss_type, reward_weights=cfg.reward_weights,
                      chat_template_kwargs={"enable_thinking": cfg.thinking}, log_completions=False,
                      per_device_eval_batch_size=cfg.batch_size, cast_lm_head_to_fp32=False)


# --------------------------------------------------------------------------- preflight on one generation group


def preflight_group(trainer: Gemma4GRPOTrainer, prompts: Sequence[Any]) -> list[dict[str, Any]]:
    """The rows of one real generation group: the first prompt with an image and the first without (where the data
    has them; else the first two prompts), each repeated ``num_generations`` times as TRL's sampler repeats it. Two
    prompts of different lengths are what padding goes into."""
    picked = [i for i in (next((i for i, p in enumerate(prompts) if p.images), None),
                          next((i for i, p in enumerate(prompts) if not p.images), None)) if i is not None]
    if len(picked) < 2 and len(prompts) > 1:
        picked.append(1 if picked[0] == 0 else 0)
    rows = trainer.train_dataset
    return [rows[i] for i in picked for _ in range(trainer.num_generations)]


def _padding_inside_prompt(group: dict[str, Any], pad_id: int) -> int:
    return int(((group["prompt_ids"] == pad_id) & group["prompt_mask"].bool()).sum())


class RecordedForwards:
    """The ``input_ids`` and ``mm_token_type_ids`` of every forward the model gets while it is entered (a forward
    pre-hook on the model under the adapter: what the model really received, whoever built the inputs)."""

    def __init__(self, model: Any) -> None:
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.forwards: list[dict[str, torch.Tensor | None]] = []

    def _hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            types = kwargs.get("mm_token_type_ids")
            self.forwards.append({"input_ids": ids.detach().cpu(),
                                  "mm_token_type_ids": None if types is None else types.detach().cpu()})

    def __enter__(self) -> RecordedForwards:
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _misaligned(forwards: list[dict[str, Any]], image: int) -> tuple[int, int]:
    """Forwards whose ``mm_token_type_ids`` differ from the image tokens of their ids, of the forwards with images."""
    with_images = [f for f in forwards if bool((f["input_ids"] == image).any())]
    bad = sum(1 for f in with_images if f["mm_token_type_ids"] is None
              or f["mm_token_type_ids"].shape != f["input_ids"].shape
              or not torch.equal(f["mm_token_type_ids"] == 1, f["input_ids"] == image))
    return bad, len(with_images)


def grpo_preflight(built: dict[str, Any], prompts: Sequence[Any], *, seed: int = 0) -> tuple[list[Finding],
                                                                                          dict[str, Any], dict]:
    """GRPO's own checks on one real generation group; returns findings, figures and the group (as SFT's supervised
    batch for the shared preflight). The model is left as it was."""
    trainer: Gemma4GRPOTrainer = built["trainer"]
    model, tokenizer = built["model"], trainer._tokenizer
    started = time.perf_counter()
    findings: list[Finding] = []
    rows = preflight_group(trainer, prompts)
    torch.manual_seed(seed)
    with torch.no_grad(), RecordedForwards(model) as recorded:
        group = trainer._generate_and_score_completions(rows)
    rewards: list[Reward] = built["rewards"]
    completions = rewards[0].completions  # as the trainer's reward calls read them for this group
    n, g = len(completions), trainer.num_generations
    per_func = torch.tensor([[math.nan if v is None else v for v in r.values] for r in rewards]).T  # (n, funcs)
    weights = torch.tensor(trainer.reward_weights.tolist())
    total = (per_func * weights).nansum(dim=1)
    spread = total.view(-1, g).std(dim=1)
    pad = _padding_inside_prompt(group, tokenizer.pad_token_id)
    bad_mm, with_images = _misaligned(recorded.forwards, trainer.batcher.token_ids["image_token"])
    think = tokenizer.convert_tokens_to_ids(THINK_TOKEN)
    switches = [int(((ids == think) & m.bool()).sum()) for ids, m in zip(group["prompt_ids"], group["prompt_mask"],
                                                                        strict=True)]
    ended = sum(c.ended for c in completions)
    figures: dict[str, Any] = {
        "completions": n, "group_size": g, "pad_tokens_inside_prompt_mask": pad,
        "forwards_with_images": with_images, "forwards_with_misaligned_mm_token_type_ids": bad_mm,
        "thinking_switches_per_prompt": sorted(set(switches)), "ended_turn": ended,
        "ended_turn_share": round(ended / n, 4), "with_thought_channel": sum(bool(c.reasoning) for c in completions),
        "reward_mean": round(float(total.mean()), 4), "reward_spread_by_group": [round(float(s), 4) for s in spread],
        "rewards": {r.__name__: [None if math.isnan(v) else round(float(v), 4) for v in per_func[:, i]]
                    for i, r in enumerate(rewards)},
        "mean_completion_tokens": round(float(group["completion_mask"].sum(1).float().mean()), 2),
        "sample": {"answer": completions[0].answer[:300], "reasoning": completions[0].reasoning[:300]},
    }
    if pad:
        findings.append(finding(PAD_IN_PROMPT.code, f"{pad} pad tokens are inside the prompt mask of the first "
                                "generation group: the model trains on padding it never sees when it answers",
                                "render prompts unpadded (gemma4-tune's GRPO does; never pass a padding processor "
                                "to TRL's GRPOTrainer)"))
    if bad_mm:
        findings.append(finding(MM_TYPES_MISALIGNED.code, f"{bad_mm} of {with_images} forwards with images got "
                                "mm_token_type_ids that do not mark exactly their image tokens: image attention and "
                                "log-probabilities are computed on shifted positions",
                                "rebuild mm_token_type_ids from the ids the model gets (gemma4-tune's GRPO does)"))
    elif group.get("pixel_values") is not None and not with_images:  # image prompts, yet no forward compared
        findings.append(finding(MM_TYPES_MISALIGNED.code, "the first generation group has image prompts, but no "
                                "forward the model received held an image token: the image types were compared on "
                                "nothing", "check that the prompts' images reach the processor (<|image|> in the "
                                "rendered prompt)"))
    expected = 1 if built["thinking"] else 0
    if any(s != expected for s in switches):
        findings.append(finding(THINKING_SWITCH.code, f"the prompts hold the thinking switch {THINK_TOKEN} "
                                f"{sorted(set(switches))} times, expected {expected} (thinking "
                                f"{'on' if expected else 'off'}): rollouts differ from how the model is served",
                                "render prompts with the official template once, with enable_thinking as you serve"))
    if n >= 2 and bool((spread == 0).all()):
        findings.append(finding(REWARDS_CONSTANT.code, f"all {n} completions of the first generation group got "
                                f"rewards equal within their group ({figure_text(float(total[0]), '.3g')}): GRPO's "
                                "advantage is 0 and that step learns nothing; if it lasts, G4T421 stops the run",
                                "make the reward tell completions apart (partial credit), raise --temperature or "
                                "--num-generations, or start from an SFT adapter that answers in the right form"))
    if not ended:
        findings.append(finding(NO_TURN_ENDS.code, f"none of {n} completions ended its turn within "
                                f"{trainer.max_completion_length} tokens: every reward judges cut-off text (G4T422 "
                                "warns if it lasts)", "raise --max-completion-length, or reward ending the turn "
                                "(--reward ends_turn), or start from an SFT adapter"))
    findings += thought_leaks(completions)
    probe = _reference_probe(trainer, model, group, seed)
    figures.update(probe)
    if built["beta"] > 0 and (not probe["reference_equals_base"] or not probe["policy_moves"]):
        findings.append(finding(GRPO_REFERENCE.code, f"with every lora_B set to noise, the GRPO reference moves "
                                f"{probe['reference_minus_base']:.3e} from the base (policy "
                                f"{probe['policy_minus_base']:.3e}): the KL term compares the model with itself",
                                "let the reference be the base with the adapter disabled (gemma4-tune's GRPO does)"))
    figures["seconds"] = round(time.perf_counter() - started, 2)
    return findings, figures, group


def thought_leaks(completions: Sequence[Any]) -> list[Finding]:
    """G4T524 (one finding, counted) for answers that still hold a thought-channel marker once the channel is taken
    out: a channel opened and never closed, or closed and never opened."""
    leaked = [c.answer for c in completions if THOUGHT_OPEN in c.answer or THOUGHT_CLOSE in c.answer]
    if not leaked:
        return []
    return [finding(THOUGHT_IN_ANSWER.code, f"{len(leaked)} of {len(completions)} answers still hold thought-channel "
                    f"text after the channel was taken out (first: {leaked[0][:80]!r}): the model writes a channel "
                    "the template does not close, and the reward judges the thought as answer", "train the format "
                    "with SFT first, or reward well-formed answers (--reward regex:...)", count=len(leaked))]


def _logps(trainer: Gemma4GRPOTrainer, model: Any, group: dict[str, Any]) -> torch.Tensor:
    ids = torch.cat([group["prompt_ids"], group["completion_ids"]], dim=1)
    mask = torch.cat([group["prompt_mask"], group["completion_mask"]], dim=1)
    extra = {k: group[k] for k in ("pixel_values", "image_position_ids", "mm_token_type_ids", "num_images")
             if group.get(k) is not None}
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, group["completion_ids"].size(1),
                                                             **extra)
    return (logps * group["completion_mask"]).sum(1)


def _reference_probe(trainer: Gemma4GRPOTrainer, model: Any, group: dict[str, Any], seed: int) -> dict[str, Any]:
    """Noise in every ``lora_B``: TRL's reference context must give the base exactly, the policy must move."""
    from trl.trainer.grpo_trainer import use_adapter

    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and p.requires_grad}
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))
            policy = _logps(trainer, model, group)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                reference = _logps(trainer, model, group)
            with model.disable_adapter():
                base = _logps(trainer, model, group)
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])
        model.train(was_training)
    return {"reference_equals_base": bool(torch.equal(reference, base)),
            "reference_minus_base": float((reference - base).abs().max()),
            "policy_minus_base": float((policy - base).abs().max()),
            "policy_moves": bool((policy - base).abs().max() > 0)}


def supervised_group(group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The generation group as SFT's supervised batch (prompt + completion, labels on the completion), for the shared
    preflight checks: a gradient into every planned part, a finite loss, ``mm_token_type_ids`` kept."""
    ids = torch.cat([group["prompt_ids"], group["completion_ids"]], dim=1)
    mask = torch.cat([group["prompt_mask"], group["completion_mask"]], dim=1)
    labels = ids.masked_fill(torch.cat([torch.zeros_like(group["prompt_mask"]), group["completion_mask"]],
                                       dim=1) == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in ("pixel_values", "image_position_ids", "mm_token_type_ids"):
        if group.get(key) is not None:
            batch[key] = group[key]
    return batch


def check_preflight_loss(loss: float) -> list[Finding]:
    """G4T501 when the GRPO loss of the first group is not finite."""
    if math.isfinite(loss):
        return []
    return [finding(LOSS_NOT_FINITE.code, f"the GRPO loss of the first generation group is {loss}",
                    "check the prompts of the first group and the dtype (fp32 on CPU, bf16 on GPU)")]


# --------------------------------------------------------------------------- guards during training


class GRPOGuard(GuardCallback):
    """SFT's guards (non-finite loss or gradient, gradient 0, LoRA not moving) and GRPO's, each over
    ``GUARD_STEPS`` logged steps in a row: rewards with no spread in any group (G4T421) stop the run (the checkpoint
    of that step is not written); every completion cut at the length limit (G4T422: cut completions still train, TRL's
    ``mask_truncated_completions`` is off, on rewards that judge cut-off text) and a KL of exactly 0 after the first
    step with ``beta > 0`` (G4T423) are warnings, once each."""

    def __init__(self, model: Any, *, beta: float, steps: int = GUARD_STEPS) -> None:
        super().__init__(model, zero_grad_steps=steps, stall_steps=steps + 1)  # G4T421 names the cause first
        self.beta, self.steps = beta, steps
        self.runs = {"spread": 0, "clipped": 0, "kl": 0}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        checks = {"spread": logs.get("frac_reward_zero_std") == 1.0,
                  "clipped": logs.get("completions/clipped_ratio") == 1.0,
                  "kl": self.beta > 0 and state.global_step > 1 and logs.get("kl") == 0.0}
        for key, hit in checks.items():
            self.runs[key] = self.runs[key] + 1 if hit else 0
        step = state.global_step
        if self.runs["spread"] >= self.steps:
            return self._stop(control, ZERO_SPREAD.code, f"for {self.runs['spread']} steps in a row (up to step {step}) "
                              "every group's completions got equal rewards: the advantages are 0 and nothing is learned "
                              f"(loss {logs['loss']}, gradient norm {logs.get('grad_norm')})", "make the reward tell "
                              "completions apart, raise --temperature or --num-generations, or start from an SFT adapter")
        if self.runs["clipped"] == self.steps and not any(f.code == ALL_CLIPPED.code for f in self.findings):
            self.findings.append(finding(ALL_CLIPPED.code, f"for {self.steps} steps in a row (up to step {step}) every "
                                         "completion was cut at --max-completion-length before ending its turn: the "
                                         "rewards judge cut-off text and the model learns to write past its answer",
                                         "raise --max-completion-length, or reward ending the turn (--reward "
                                         "ends_turn)"))
        if self.runs["kl"] == self.steps and not any(f.code == KL_STUCK.code for f in self.findings):
            self.findings.append(finding(KL_STUCK.code, f"the KL to the reference was exactly 0 for {self.steps} logged "
                                         f"steps after the first (up to step {step}) with beta {self.beta}: the "
                                         "reference is the policy itself, or the policy does not change", "let the "
                                         "reference be the base with the adapter disabled, and check that the "
                                         "gradient is not 0 (G4T404 stops a run whose gradient stays 0)"))
        super().on_log(args, state, control, logs=logs, **kwargs)


# --------------------------------------------------------------------------- held-out evaluation


def generate_answers(model: Any, batcher: Any, prompts: Sequence[Any], *, max_new_tokens: int,
                     eos: list[int]) -> list[list[int]]:
    """Greedy completions (token ids, up to and including ``<turn|>``) of each prompt, one at a time."""
    out = []
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            inputs, _ = batcher.encode_generation(prompt.messages, source=prompt.source)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=batcher.pad_token_id)
            out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    finally:
        model.train(was_training)
    return out


def score(rewards: Sequence[Reward], weights: Sequence[float], prompts: Sequence[Any], ids: list[list[int]],
          tokenizer: Any) -> dict[str, Any]:
    """The rewards of greedy completions: mean per function and weighted total, share that ended the turn, length."""
    completions = [read_completion(tokenizer, c) for c in ids]
    columns = {k: [p.columns.get(k) for p in prompts] for k in sorted({k for p in prompts for k in p.columns})}
    row: dict[str, Any] = {}
    total = [0.0] * len(ids)
    for reward, weight in zip(rewards, weights, strict=True):
        values = reward(prompts=[trl_messages(p.messages) for p in prompts], completions=[[c.message()]
                        for c in completions], completion_ids=ids, **columns)
        present = [v for v in values if v is not None]
        row[f"eval_rewards/{reward.__name__}"] = sum(present) / len(present) if present else None
        total = [t + weight * (v or 0.0) for t, v in zip(total, values, strict=True)]
    row["eval_reward"] = sum(total) / len(total)
    row["eval_ended_turn"] = sum(c.ended for c in completions) / len(completions)
    row["eval_completion_tokens"] = sum(len(c) for c in ids) / len(ids)
    row["answers"] = [c.answer for c in completions]
    row["ended"] = [c.ended for c in completions]
    return row


def not_learning(first: dict[str, Any], last: dict[str, Any]) -> list[Finding]:
    """G4T527 when the held-out reward did not rise."""
    before, after = first.get("eval_reward"), last.get("eval_reward")
    if before is not None and after is not None and after > before:
        return []
    return [finding(GRPO_NOT_LEARNING.code, f"held-out reward (greedy) {figure_text(before, '.3f')} -> "
                    f"{figure_text(after, '.3f')}: the tuned model does not score better than the base",
                    "train longer or with a higher --lr, check the reward on a few answers by hand, and look at "
                    "the reward spread in the report (rewards equal within groups teach nothing)")]



def eval_row(step: int, scored: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row of held-out figures at ``step`` (answers left out)."""
    return {"step": step, **{k: v for k, v in scored.items() if k not in ("answers", "ended")}}


def grpo_plot(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Reward per function, completion length, clipped ratio and KL over the training steps (held-out reward
    marked)."""
    steps = [m for m in metrics if "reward" in m and "loss" in m]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    x = [m["step"] for m in steps]
    names = sorted({k for m in steps for k in m if k.startswith("rewards/") and k.endswith("/mean")})
    for name in names:
        axes[0].plot(x, [m.get(name) for m in steps], label=name.split("/")[1])
    axes[0].plot(x, [m["reward"] for m in steps], "k--", label="total")
    evals = [m for m in metrics if "eval_reward" in m]
    if evals:
        axes[0].plot([m["step"] for m in evals], [m["eval_reward"] for m in evals], "o-", label="held-out (greedy)")
    axes[0].set(xlabel="step", ylabel="reward", title="rewards")
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], "completions/mean_length", "completion length (tokens)"),
                           (axes[2], "completions/clipped_ratio", "share cut at the length limit"),
                           (axes[3], "kl", "KL to the base")):
        ax.plot(x, [m.get(key) for m in steps])
        ax.set(xlabel="step", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["GRPOGuard", "Gemma4GRPOTrainer", "aligned_token_types", "grpo_config", "grpo_plot",
           "grpo_preflight", "not_learning", "score", "stop_at_end_of_turn", "supervised_group", "trl_dataset"]
