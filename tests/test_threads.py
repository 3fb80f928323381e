"""A busy machine slows work proportionally (issue 22, item 9): torch gets the cores that are idle when a model
command starts, not one spinning thread per core. The slowdown itself is measured in bench/under_load.py
(timings belong in bench/, not in tests)."""

from __future__ import annotations

import subprocess
import sys

from gemma4_tune.threads import busy_cores, choose_threads


def test_threads_are_the_idle_cores_at_least_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(cores=2, busy=0.0) == 2
    assert choose_threads(cores=2, busy=0.7) == 1
    assert choose_threads(cores=2, busy=2.5) == 1
    assert choose_threads(cores=16, busy=4.2) == 12


def test_a_users_thread_count_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(cores=2, busy=2.0) == 3


def test_a_busy_process_beside_us_is_seen():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(0.3)
    finally:
        hog.kill()
        hog.wait()
    assert busy >= 0.5
