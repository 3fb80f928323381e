"""The training methods as units of one kind (train/methods/): found by name, each a Method with every part."""

from __future__ import annotations

import inspect

import pytest

from gemma4_tune.train import methods
from gemma4_tune.train.base import Method

PARTS = ("read_data", "build_trainer", "preflight", "evaluate", "report_section", "train", "preflight_only")


@pytest.mark.parametrize("name", methods.names())
def test_the_registry_finds_each_method_and_each_unit_implements_every_part(name: str) -> None:
    unit = methods.get(name)
    assert name in methods.names()
    assert isinstance(unit, Method) and unit.name == name and unit.description
    assert unit is methods.get(name), "one unit per method"
    for part in PARTS:
        own = getattr(type(unit), part)
        assert own is not getattr(Method, part) and not getattr(own, "__isabstractmethod__", False), (name, part)
    assert not inspect.isabstract(type(unit))


def test_an_unknown_method_is_a_value_error_naming_the_methods() -> None:
    assert {"sft", "dpo", "kto"} <= set(methods.names())
    with pytest.raises(ValueError, match=f"unknown training method 'ppo': the methods are {', '.join(methods.names())}"):
        methods.get("ppo")
