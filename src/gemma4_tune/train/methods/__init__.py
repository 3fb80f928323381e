"""The training methods, found by name: one unit (module) per method, each defining ``METHOD``, an instance of
its :class:`~gemma4_tune.train.base.Method` subclass. A new method is one new module plus one line here.

Units are imported on first use (TRL, which DPO and KTO run on, is slow to import), and never import each other.
"""

from __future__ import annotations

import importlib

from gemma4_tune.train.base import Method

#: --method name -> the module of its unit.
METHODS: dict[str, str] = {
    "sft": "gemma4_tune.train.methods.sft",
    "dpo": "gemma4_tune.train.methods.dpo",
    "kto": "gemma4_tune.train.methods.kto",
    "grpo": "gemma4_tune.train.methods.grpo",
}


def names() -> list[str]:
    """The methods' names, as ``--method`` takes them."""
    return list(METHODS)


def get(name: str) -> Method:
    """The unit of the method ``name``; a ValueError naming the methods for an unknown one."""
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}: the methods are {', '.join(names())}")
    return importlib.import_module(METHODS[name]).METHOD
