"""Training steps on a busy machine: how much slower with two CPU-bound processes beside them, with torch's
default threads (one per core, spinning at OpenMP barriers), with the alternatives (passive waiting, one thread)
and with what gemma4-tune chooses (the cores idle when the command starts, ``gemma4_tune/threads.py``).

The work: LoRA training steps (forward, backward, AdamW) of a tiny E2B-shaped model with the real
transformers and PEFT classes, in a fresh process per run (the wait policy is read when OpenMP starts).
Each setting runs idle and then beside ``--hogs`` busy-looping processes; the figure is the median of
``--repeats`` runs, and the result is the loaded/idle ratio of each setting, side by side in one run.
A proportional slowdown is about (hogs + threads) / cores.

Writes bench/results/under_load.json (about 6 minutes on 2 idle cores); with ``--demo``, the whole demo the same
way, bench/results/under_load_demo.json (about 6 minutes; the timeout is 600 s per demo).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result  # noqa: E402

WORK = """
import sys, time, torch
from transformers import Gemma4ForConditionalGeneration
if sys.argv[3] == "choose":
    from gemma4_tune.threads import use_idle_cores
    use_idle_cores()
from gemma4_tune.plan.adapters import LoraSettings, prepare_model
model, _ = prepare_model(Gemma4ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32), "text",
                         LoraSettings(rank=8))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(10, 200, (1, 128), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
for _ in range(int(sys.argv[2])):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
print(time.perf_counter() - start, torch.get_num_threads())
"""
WHAT = ("LoRA training steps of a tiny E2B idle and beside busy-looping processes, per thread setting: torch's "
        "default (a thread per core, spinning at OpenMP barriers), passive waiting, one thread, and gemma4-tune's "
        "choice (the cores idle when the command starts)")
SETTINGS = {"torch default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread": {"OMP_NUM_THREADS": "1"}, "gemma4-tune (idle cores)": {"choose": "1"}}


def run_steps(base: Path, steps: int, env: dict[str, str], timeout_s: float) -> tuple[float, int | None]:
    """Seconds for ``steps`` training steps in a fresh process with ``env`` (NaN past the timeout), and the
    number of threads torch used there.

    ``{"choose": ...}`` stands for gemma4-tune's choice, made in the child as the CLI makes it.
    """
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    choose = "choose" if "choose" in env else "-"
    extra = {k: v for k, v in env.items() if k != "choose"}
    try:
        proc = subprocess.run([sys.executable, "-c", WORK, str(base), str(steps), choose], env={**clean, **extra},
                              capture_output=True, text=True, timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        return float("nan"), None
    seconds, threads = proc.stdout.split()[:2]
    return float(seconds), int(threads)


def run_demo(out: Path, env: dict[str, str], timeout_s: float) -> float:
    """Seconds for ``gemma4-tune demo`` (the whole pipeline) into a new ``out``; NaN past the timeout."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-c", "from gemma4_tune.cli import main; main()", "demo", "--out", str(out)],
                       env={**clean, **env}, capture_output=True, text=True, timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        return float("nan")
    return time.perf_counter() - start


def demo(args: argparse.Namespace) -> None:
    """The issue's measure: the demo idle, and beside the busy processes with gemma4-tune's threads and with a
    thread per core (``OMP_NUM_THREADS=2``, what torch did before)."""
    started = machine()
    with tempfile.TemporaryDirectory() as tmp:
        figures: dict[str, Any] = {"idle": run_demo(Path(tmp) / "idle", {}, args.timeout)}
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
        try:
            time.sleep(1.0)
            figures["loaded, gemma4-tune threads"] = run_demo(Path(tmp) / "ours", {}, args.timeout)
            figures["loaded, a thread per core"] = run_demo(Path(tmp) / "per-core", {"OMP_NUM_THREADS": "2"},
                                                            args.timeout)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
    for name, seconds in figures.items():
        print(f"demo {name}: {seconds:.1f} s")
    payload = {"what": f"`gemma4-tune demo` idle and beside {args.hogs} busy-looping processes", "hogs": args.hogs,
               "seconds": figures, "ratio": {k: v / figures["idle"] for k, v in figures.items() if k != "idle"}}
    print(write_result("under_load_demo", started, payload))


def main() -> None:
    """Measure each setting idle and loaded; write the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--demo", action="store_true", help="measure the whole demo instead (about 6 minutes)")
    args = parser.parse_args()
    if args.demo:
        demo(args)
        return
    started = machine()
    from gemma4_tune.api import tiny_model

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_model("e2b", Path(tmp) / "e2b", seed=0)
        for name, env in SETTINGS.items():
            idle_runs = [run_steps(base, args.steps, env, args.timeout) for _ in range(args.repeats)]
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
            try:
                time.sleep(1.0)
                loaded_runs = [run_steps(base, args.steps, env, args.timeout) for _ in range(args.repeats)]
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            idle, loaded = [t for t, _ in idle_runs], [t for t, _ in loaded_runs]
            figures[name] = {"env": env, "idle_s": idle, "loaded_s": loaded,
                             "idle_threads": [n for _, n in idle_runs], "loaded_threads": [n for _, n in loaded_runs],
                             "idle_median_s": statistics.median(idle), "loaded_median_s": statistics.median(loaded),
                             "loaded_over_idle": statistics.median(loaded) / statistics.median(idle)}
            print(f"{name}: idle {figures[name]['idle_median_s']:.2f} s, beside {args.hogs} busy processes "
                  f"{figures[name]['loaded_median_s']:.2f} s ({figures[name]['loaded_over_idle']:.1f}x)")
    default, ours = figures["torch default"], figures["gemma4-tune (idle cores)"]
    payload = {"what": WHAT, "steps": args.steps, "hogs": args.hogs, "repeats": args.repeats, "settings": figures,
               "proportional_slowdown": (args.hogs + 2) / (os.cpu_count() or 1),
               "ratio": {"ours_idle_over_default_idle": ours["idle_median_s"] / default["idle_median_s"],
                         "default_loaded_over_idle": default["loaded_over_idle"],
                         "ours_loaded_over_idle": ours["loaded_over_idle"]}}
    print(write_result("under_load", started, payload))


if __name__ == "__main__":
    main()
