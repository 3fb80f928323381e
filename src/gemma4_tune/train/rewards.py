"""GRPO reward functions: the user's (``FILE.py:FUNC``, ``module:FUNC``), the built-ins, and the wrapper every one of
them runs in.

A reward has TRL's signature, ``reward(prompts, completions, completion_ids, **columns) -> list[float | None]``:
``completions[i]`` is ``[{"role": "assistant", "content": answer, "reasoning_content": thought}]`` where ``answer``
is the text of the model's turn up to ``<turn|>`` **without** its thought channel (``<|channel>thought ...
<channel|>``), which is in ``reasoning_content``. TRL would hand the reward the thought and the answer run together
(``'thoughtlet me thinkThe answer is 7'``: it decodes with ``skip_special_tokens``); :class:`Reward` re-reads every
completion from its token ids first. ``columns`` are the row's other columns (``answer``, ...), one per completion.
``None`` means "not applicable" (TRL's meaning: ignored in the weighted sum); a NaN, an infinity, a non-number or
the wrong count is G4T517, naming the function.

Built-ins (``--reward NAME[:ARG]``):

- ``ends_turn``: 1 when the completion ends its turn (``<turn|>``) within ``--max-completion-length``, else 0;
- ``exact[:COLUMN]``: 1 when the answer equals the column (default ``answer``), whitespace trimmed, else 0;
- ``numeric[:COLUMN]``: 1 when the answer's last number equals the column's number, else 0;
- ``regex:PATTERN``: 1 when the whole answer (trimmed) matches ``PATTERN`` (Python ``re.fullmatch``, DOTALL), else 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4_tune.data.chat import END_OF_TURN
from gemma4_tune.findings import FindingError, Severity, finding, register

REWARD_NOT_FOUND = register("G4T516", Severity.ERROR, "A GRPO reward function cannot be loaded")
REWARD_BAD_OUTPUT = register("G4T517", Severity.ERROR, "A GRPO reward function returned other than one number per "
                             "completion")

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"
_THOUGHT = re.compile(re.escape(THOUGHT_OPEN) + r"(?:thought\n?)?(.*?)(?:" + re.escape(THOUGHT_CLOSE) + "|$)", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
BUILTINS = ("ends_turn", "exact", "numeric", "regex")


@dataclass(frozen=True)
class Completion:
    """One generated turn, read from its tokens: the answer, the thought channel, whether it ended its turn."""

    answer: str
    reasoning: str
    ended: bool

    def message(self) -> dict[str, Any]:
        """The completion as the assistant message a reward gets (TRL's conversational completion)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.answer}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        return message


def read_completion(tokenizer: Any, ids: Sequence[int]) -> Completion:
    """A completion's answer without its thought channel, the thought, and whether it ended at ``<turn|>``."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    ended = END_OF_TURN in text
    text = text.split(END_OF_TURN, 1)[0]
    reasoning = "\n".join(m.group(1).strip() for m in _THOUGHT.finditer(text))
    answer = _THOUGHT.sub("", text)
    specials = [t for t in tokenizer.all_special_tokens if t and t in answer and t not in (THOUGHT_OPEN, THOUGHT_CLOSE)]
    for token in specials:  # <eos>, <pad>... never part of an answer (a stray channel marker stays: G4T524)
        answer = answer.replace(token, "")
    return Completion(answer.strip(), reasoning, ended)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    found = _NUMBER.findall(str(value))
    return float(found[-1].replace(",", "")) if found else None


def _answers(completions: list[Any]) -> list[str]:
    return [c[0]["content"] if isinstance(c, list) else str(c) for c in completions]


def builtin(spec: str, end_of_turn: int) -> Callable[..., list[float]]:
    """A built-in reward by its spec (``ends_turn``, ``exact[:COLUMN]``, ``numeric[:COLUMN]``, ``regex:PATTERN``)."""
    name, _, arg = spec.partition(":")
    if name == "ends_turn":
        def ends_turn(completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
            return [float(end_of_turn in ids) for ids in completion_ids]
        return ends_turn
    if name in ("exact", "numeric"):
        column = arg or "answer"

        def match(completions: list[Any], **columns: Any) -> list[float]:
            if column not in columns:
                raise FindingError(finding(REWARD_NOT_FOUND.code, f"reward {spec}: the data has no {column!r} column "
                                           f"(columns: {', '.join(sorted(columns)) or 'none'})",
                                           f"add a {column!r} column, or name another one: --reward {name}:COLUMN"))
            if name == "exact":
                return [float(a.strip() == str(t).strip()) for a, t in zip(_answers(completions), columns[column],
                                                                          strict=True)]
            return [float(a is not None and t is not None and math.isclose(a, t, rel_tol=1e-9, abs_tol=1e-9))
                    for a, t in zip((_number(a) for a in _answers(completions)), (_number(t) for t in columns[column]),
                                    strict=True)]
        match.__name__ = f"{name}_{column}"
        return match
    if name == "regex":
        try:
            pattern = re.compile(arg, re.S)
        except re.error as exc:
            raise FindingError(finding(REWARD_NOT_FOUND.code, f"reward {spec}: not a valid regular expression ({exc})",
                                       "fix the pattern (Python re syntax)")) from None

        def regex(completions: list[Any], **_: Any) -> list[float]:
            return [float(pattern.fullmatch(a.strip()) is not None) for a in _answers(completions)]
        return regex
    raise FindingError(finding(REWARD_NOT_FOUND.code, f"--reward {spec}: no built-in of that name",
                               f"use one of {', '.join(BUILTINS)}, FILE.py:FUNC or module:FUNC"))


def _import_from_cwd(name: str) -> Any:
    """Import ``name`` as ``python`` run in this directory would (Axolotl imports ``trl.reward_funcs`` so)."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def load_user_reward(spec: str) -> Callable[..., Any]:
    """``FILE.py:FUNC`` or ``module:FUNC`` as a callable, or G4T516 saying what is missing."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            module_name = f"gemma4_tune_reward_{abs(hash(str(path)))}"
            module = sys.modules.get(module_name)  # checked before the model loads, built after: run the file once
            if module is None:
                module_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
                sys.modules[module_name] = module
                try:
                    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    del sys.modules[module_name]  # a file that failed is read afresh, never half-loaded
                    raise
        else:
            module = _import_from_cwd(where)
        func = getattr(module, name)
    except Exception as exc:  # the user's file: anything it raises on import is the finding
        raise FindingError(finding(REWARD_NOT_FOUND.code, f"--reward {spec}: {type(exc).__name__}: {exc}",
                                   "give FILE.py:FUNC (a path to a Python file and a function in it) or module:FUNC "
                                   "(an importable module)")) from None
    if not callable(func):
        raise FindingError(finding(REWARD_NOT_FOUND.code, f"--reward {spec}: {name} is not a function",
                                   "name a function with TRL's signature: reward(prompts, completions, **kwargs)"))
    params = inspect.signature(func).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise FindingError(finding(REWARD_NOT_FOUND.code, f"--reward {spec}: {name} takes no **kwargs; TRL calls it "
                                   "with prompts, completions, completion_ids and every data column as keywords",
                                   "give it TRL's signature: def reward(prompts, completions, **kwargs)"))
    return func


class Reward:
    """One reward function as TRL calls it, with the completions re-read from their tokens first (answer without the
    thought channel) and its output checked: one number (or None) per completion, finite (G4T517). The last call's
    completions and values stay readable (GRPO's preflight reports them without calling the user's function again)."""

    def __init__(self, spec: str, func: Callable[..., Any], tokenizer: Any) -> None:
        self.spec, self.func, self.tokenizer = spec, func, tokenizer
        self.__name__ = getattr(func, "__name__", spec).replace("<lambda>", spec)
        self.completions: list[Completion] = []
        self.values: list[float | None] = []

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 **columns: Any) -> list[float | None]:
        self.completions = [read_completion(self.tokenizer, ids) for ids in completion_ids]
        read = [[c.message()] for c in self.completions]
        out = self.func(prompts=prompts, completions=read, completion_ids=completion_ids, **columns)
        self.values = check_rewards(self.__name__, out, len(completion_ids))
        return self.values


def check_rewards(name: str, values: Any, expected: int) -> list[float | None]:
    """``values`` as one float (or None) per completion, or G4T517 naming the reward and what is wrong."""
    problem = None
    if not isinstance(values, (list, tuple)) and not hasattr(values, "tolist"):
        problem = f"returned {type(values).__name__}, not a list"
    else:
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        if len(values) != expected:
            problem = f"returned {len(values)} rewards for {expected} completions"
        else:
            bad = [v for v in values if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                             or not math.isfinite(v))]
            if bad:
                problem = f"returned {len(bad)} values that are not finite numbers (first: {bad[0]!r})"
    if problem:
        raise FindingError(finding(REWARD_BAD_OUTPUT.code, f"reward {name} {problem}", "return one float per "
                                   "completion (None where the reward does not apply), in the order of completions"))
    return [None if v is None else float(v) for v in values]


def build_rewards(specs: Sequence[str], tokenizer: Any) -> list[Reward]:
    """Every ``--reward`` as a :class:`Reward`, built-ins by name, user functions by path or module."""
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    rewards = []
    for spec in specs:
        name = spec.partition(":")[0]
        func = builtin(spec, end_of_turn) if name in BUILTINS else load_user_reward(spec)
        rewards.append(Reward(spec, func, tokenizer))
    return rewards


def required_columns(specs: Sequence[str]) -> dict[str, str]:
    """The data columns the built-ins among ``specs`` read (``exact`` / ``numeric``), each with its spec."""
    needed = {}
    for spec in specs:
        name, _, arg = spec.partition(":")
        if name in ("exact", "numeric"):
            needed[arg or "answer"] = spec
    return needed


def check_reward_specs(specs: Sequence[str]) -> None:
    """Load every ``--reward`` before any model: a missing file, function or bad pattern is G4T516 now."""
    for spec in specs:
        name = spec.partition(":")[0]
        if name in BUILTINS:
            builtin(spec, 0)
        elif ":" not in spec:
            raise FindingError(finding(REWARD_NOT_FOUND.code, f"--reward {spec}: neither a built-in nor FILE.py:FUNC "
                                       "or module:FUNC", f"use one of {', '.join(BUILTINS)}, FILE.py:FUNC or "
                                       "module:FUNC"))
        else:
            load_user_reward(spec)
