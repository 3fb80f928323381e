"""LoRA on the vision tower's ``Gemma4ClippableLinear``: forward + backward time against plain ``nn.Linear``.

Ours: ``prepare_model(model, "vision")`` wraps the inner ``.linear`` of each clipped linear, so the
input/output clamps stay in the forward pass. Baseline: a copy of the same model whose clipped
linears are replaced by their inner ``nn.Linear`` (no clamps), with stock PEFT LoRA on the same
modules, same rank. Both towers see the same images and are timed in turns (the order rotated
every round) after a warm-up; the figure is the median over the rounds of the per-round ratio. A
third side, ours with the clamps switched off, tells the clamps' cost from the LoRA wrapping's.

Writes bench/results/clippable_lora.json.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

import common
import torch

sys.path.insert(0, str(common.BENCH.parent / "tests"))
from lora_helpers import unwrap_clippable  # noqa: E402 - the one implementation of the unwrap fix

RANK = 16
IMAGES = 1
WARMUP = 2
ROUNDS = 10


def vision_inputs(config: Any, images: int) -> dict[str, torch.Tensor]:
    """Random images at the tiny processor's budget, as the processor lays them out."""
    from gemma4_tune.model.tiny import TINY_IMAGE_SOFT_TOKENS

    vc = config.vision_config
    side = int(TINY_IMAGE_SOFT_TOKENS ** 0.5) * vc.pooling_kernel_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((images, side * side, 3 * vc.patch_size**2), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0).expand(images, -1, -1)
    return {"pixel_values": pixels, "pixel_position_ids": positions.contiguous()}


def step_seconds(peft_model: Any, inputs: dict[str, torch.Tensor]) -> float:
    """One forward + backward of the vision tower (sum of squares of its output)."""
    tower = peft_model.get_base_model().model.vision_tower
    peft_model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    out = tower(**inputs).last_hidden_state
    out.float().pow(2).mean().backward()
    return time.perf_counter() - started


def clamp_backward_cost(shape: tuple[int, int], repeats: int = 5) -> dict[str, float]:
    """Median seconds of clamp forward+backward with tensor bounds (as Gemma4ClippableLinear) vs float bounds."""
    x = torch.randn(shape, requires_grad=True)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    result = {}
    for name, bounds in (("tensor_bounds", (lo, hi)), ("float_bounds", (-1.0, 1.0)), ("no_clamp", None)):
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            y = torch.clamp(x, *bounds) if bounds else x * 1.0
            y.sum().backward()
            runs.append(time.perf_counter() - started)
        result[name] = round(common.median(runs), 5)
    return result


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma4ForConditionalGeneration

    from gemma4_tune.plan.adapters import LoraSettings, prepare_model

    started = common.machine()
    path = common.bench_model()
    base = Gemma4ForConditionalGeneration.from_pretrained(str(path))
    plain_base = copy.deepcopy(base)
    ours, plan = prepare_model(base, "vision", LoraSettings(rank=RANK))
    unwrapped = unwrap_clippable(plain_base)
    plain_targets = [name.removesuffix(".linear") for name in plan.target_modules]
    plain = get_peft_model(plain_base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=plain_targets))
    trainable = {side: sum(p.numel() for p in m.parameters() if p.requires_grad)
                 for side, m in (("ours", ours), ("plain", plain))}
    # Diagnosis: our LoRA with the clamps switched off, to tell the clamps' cost from the wrapping's.
    clamps_off = copy.deepcopy(ours)
    for module in clamps_off.modules():
        if hasattr(module, "use_clipped_linears"):
            module.use_clipped_linears = False
    models = {"ours": ours, "plain": plain, "ours_clamps_off": clamps_off}
    for m in models.values():
        m.train()
    inputs = vision_inputs(base.config, IMAGES)
    for _ in range(WARMUP):
        for m in models.values():
            step_seconds(m, inputs)
    times: dict[str, list[float]] = {side: [] for side in models}
    ratios, off_ratios = [], []
    names = list(models)
    for i in range(ROUNDS):
        order = names[i % 3:] + names[:i % 3]
        seconds = {side: step_seconds(models[side], inputs) for side in order}
        for side, value in seconds.items():
            times[side].append(round(value, 4))
        ratios.append(seconds["ours"] / seconds["plain"])
        off_ratios.append(seconds["ours_clamps_off"] / seconds["plain"])
    ratio = common.median(ratios)
    width = base.config.vision_config.intermediate_size
    diagnosis = {"clamp_fwd_bwd_seconds_one_mlp_activation": clamp_backward_cost(
        (int(inputs["pixel_values"].shape[0] * inputs["pixel_values"].shape[1]), width)),
        "clamps_per_step": 2 * len(plan.target_modules),
        "ours_clamps_off_median_s": round(common.median(times["ours_clamps_off"]), 4),
        "ours_clamps_off_vs_plain_ratio": round(common.median(off_ratios), 3)}
    common.write_result("clippable_lora", started, {
        "what": "vision tower forward+backward: our LoRA on Gemma4ClippableLinear.linear (clamps kept) vs "
                "PEFT LoRA on plain nn.Linear (clipped linears unwrapped)",
        "model": common.model_shape(path),
        "data": {"images": IMAGES, "patches_per_image": int(inputs["pixel_values"].shape[1])},
        "settings": {"rank": RANK, "alpha": 2 * RANK, "warmup": WARMUP, "rounds": ROUNDS, "order": "rotated each round",
                     "lora_modules": len(plan.target_modules), "clipped_linears_unwrapped": unwrapped,
                     "trainable_parameters": trainable, "dtype": "float32", "threads": torch.get_num_threads()},
        "figures": {"ours_median_s": round(common.median(times["ours"]), 4),
                    "plain_median_s": round(common.median(times["plain"]), 4), "seconds": times},
        "diagnosis": diagnosis,
        "ratio": round(ratio, 3), "ratio_means": "median over rounds of ours seconds / plain seconds",
        "goal": common.goal(ratio, 1.05, at_least=False)})


if __name__ == "__main__":
    main()
