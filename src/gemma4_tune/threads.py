"""How many CPU threads torch uses: as many as the cores that are idle when the command starts.

Two threads that spin at OpenMP barriers beside two CPU-bound processes on 2 cores made LoRA steps of a
tiny Gemma 4 4.9-7.7x slower; one thread there is 1.3x slower than idle, and on an idle machine the full
count is fastest (bench/under_load.py). A value the user set in ``OMP_NUM_THREADS`` is kept.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def busy_cores(sample_s: float = 0.1) -> float:
    """How many cores other work keeps busy now: /proc/stat over ``sample_s`` less this process's own CPU time
    (OpenMP threads still spinning after torch's last parallel region), else the 1-minute load average."""
    cores = os.cpu_count() or 1
    first, own, start = _cpu_times(), _own_seconds(), time.monotonic()
    if first is None:
        return min(float(cores), os.getloadavg()[0])
    time.sleep(sample_s)
    second = _cpu_times()
    assert second is not None
    total = second[1] - first[1]
    if total <= 0:
        return 0.0
    ours = (_own_seconds() - own) / max(time.monotonic() - start, 1e-9)
    return max(0.0, cores * (second[0] - first[0]) / total - ours)


def choose_threads(cores: int | None = None, busy: float | None = None) -> int:
    """Threads for torch: ``OMP_NUM_THREADS`` if the user set it, else the idle cores (at least one)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = cores or os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    return max(1, min(cores, round(cores - busy)))


def use_idle_cores() -> int:
    """Set torch's intra-op threads to :func:`choose_threads`; return the count."""
    import torch

    threads = choose_threads()
    torch.set_num_threads(threads)
    return threads
