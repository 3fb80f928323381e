"""GRPO prompts: each row read into a prompt conversation and the columns handed to the reward functions.

Files and splits are read by ``files.read_rows`` (through ``datasets``), messages by the SFT readers (roles,
ShareGPT ``from``/``value``) and validated by ``records.read_message`` (content parts, media paths resolved and
checked), as for preference pairs. A row's prompt is, in this order:

- ``prompt``: a string (one user turn) or a list of messages (TRL's "prompt-only" rows, standard or conversational);
- ``messages`` / ``conversations``: a conversation whose final assistant turn, if any, is dropped (it is the answer
  GRPO generates; its text is kept as the ``answer`` column when the row has none, and that is said in the summary).

Images come as content parts with a path or as an ``images`` column paired with ``<image>`` placeholders or path-less
``{"type": "image"}`` parts (``formats.fill_media``). Audio and tools are refused by name (G4T331): TRL 1.16's GRPO
path does not pass them to the processor. Every other column of the row goes, unchanged, to the reward functions
(TRL's signature: ``reward(prompts, completions, completion_ids, **columns)``), so no field is dropped in silence:
the summary names them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_tune.data.files import RowError, read_rows
from gemma4_tune.data.formats import ChatOptions, chat_messages, fill_media
from gemma4_tune.data.records import DataSource, read_message
from gemma4_tune.findings import Finding, FindingError, Severity, finding, register

NO_PROMPT = register("G4T330", Severity.ERROR, "GRPO row has no usable prompt")
PROMPT_NOT_PASSED = register("G4T331", Severity.ERROR, "GRPO prompt with audio or tools")
NO_PROMPTS = register("G4T332", Severity.ERROR, "No usable GRPO prompt in the data")

#: Columns a prompt is read from, the first one present; the others go to the reward functions like any column.
_PROMPT_COLUMNS = ("prompt", "messages", "conversations")
#: Media columns paired with the prompt's placeholders.
_MEDIA_COLUMNS = ("images", "image", "audios", "audio")


@dataclass
class PromptRow:
    """One GRPO prompt: messages (content as parts, media with absolute paths), the reward columns, where it is from."""

    messages: list[dict]
    columns: dict[str, Any]
    source: str
    answer_from_conversation: bool = False  # ``answer`` is the conversation's final assistant turn, dropped from it

    @property
    def images(self) -> list[str]:
        """Absolute image paths in order of appearance."""
        return [p["path"] for m in self.messages for p in m["content"] if p["type"] == "image"]

    def conversation(self) -> Any:
        """The prompt as a ``records.Conversation`` (held-out split identity, samples)."""
        from gemma4_tune.data.records import Conversation

        return Conversation(messages=self.messages, tools=None, source=self.source)


@dataclass
class PromptReport:
    """What reading found: rows, prompts kept, dropped by reason, reward columns, modalities."""

    path: str
    rows: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    columns: Counter[str] = field(default_factory=Counter)
    answers_from_conversation: int = 0
    images: int = 0

    def summary(self) -> str:
        """One line for the terminal."""
        handed = ", ".join(f"{k} ({n})" for k, n in sorted(self.columns.items())) or "none"
        said = (f"; {self.answers_from_conversation} final assistant turns dropped and kept as `answer`"
                if self.answers_from_conversation else "")
        return (f"{self.path}: {self.kept} of {self.rows} rows as GRPO prompts ({self.images} with images); columns "
                f"handed to the reward functions: {handed}{said}")

    def to_dict(self) -> dict[str, Any]:
        """The figures for report.json."""
        return {"path": self.path, "rows": self.rows, "prompts": self.kept, "dropped": dict(self.dropped),
                "reward_columns": dict(self.columns), "answers_from_conversation": self.answers_from_conversation,
                "modalities": {"image": self.images}}


def _messages(value: Any, name: str, options: ChatOptions) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError("bad_prompt", name, "expected a string or a non-empty list of messages")
    sharegpt = all(isinstance(m, Mapping) and "from" in m for m in value)
    messages, _ = chat_messages(value, name, options, sharegpt=sharegpt)
    for message in messages:
        message.pop("train", None)
    return messages


def read_prompt_row(row: Any, where: str, base: Path, options: ChatOptions | None = None) -> PromptRow:
    """One row as a GRPO prompt, or ``RowError`` (reason, field, problem)."""
    options = options or ChatOptions()
    if not isinstance(row, Mapping):
        raise RowError("bad_row", "", f"expected an object, got {type(row).__name__}")
    column = next((c for c in _PROMPT_COLUMNS if row.get(c) not in (None, "", [])), None)
    if column is None:
        raise RowError("no_prompt", "prompt", "no `prompt` (string or messages), `messages` or `conversations`")
    messages = _messages(row[column], column, options)
    columns = {k: v for k, v in row.items() if k != column and k not in _MEDIA_COLUMNS}  # another prompt-like
    answer_from_conversation = False  # column of the row is not read as the prompt: the rewards get it
    if column != "prompt" and messages[-1]["role"] == "assistant":
        answer = messages.pop()
        if "answer" not in columns and isinstance(answer.get("content"), str):
            columns["answer"] = answer["content"]
            answer_from_conversation = True
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise RowError("no_prompt", column, "the prompt must end with a user turn (the model answers it)")
    if row.get("tools"):
        raise RowError("tools", "tools", "tools")
    fill_media(messages, row)
    nulls: Counter[str] = Counter()
    read = [read_message(m, f"{column}[{i}]", base, nulls) for i, m in enumerate(messages)]
    if any(p["type"] == "audio" for m in read for p in m["content"]):
        raise RowError("audio", column, "audio")
    return PromptRow(read, columns, where, answer_from_conversation)


def load_prompts(sources: list[DataSource], *, skip_invalid: bool = False) -> tuple[list[PromptRow], list[PromptReport],
                                                                                   list[Finding]]:
    """Every source's rows as GRPO prompts; one finding per problem with its count and first rows.

    Audio or tools are G4T331 (never dropped by ``skip_invalid``: they are a limit of the trainer, not bad rows);
    other bad rows are G4T330 (warnings with ``skip_invalid``); nothing left is G4T332.
    """
    prompts: list[PromptRow] = []
    reports: list[PromptReport] = []
    findings: list[Finding] = []
    refused: dict[str, list[str]] = {}
    for source in sources:
        rows = read_rows(source.path, source.split)
        report = PromptReport(path=source.path, rows=len(rows.rows))
        bad: dict[str, list[str]] = {}
        for where, row in rows.rows:
            try:
                prompt = read_prompt_row(row, where, rows.base, source.options)
            except RowError as exc:
                if exc.reason in ("audio", "tools"):
                    refused.setdefault(exc.reason, []).append(where)
                else:
                    bad.setdefault(str(exc), []).append(where)
                report.dropped[exc.reason] += 1
                continue
            report.answers_from_conversation += prompt.answer_from_conversation
            report.kept += 1
            report.images += bool(prompt.images)
            report.columns.update(prompt.columns.keys())
            prompts.append(prompt)
        for problem, where in bad.items():
            findings.append(finding(NO_PROMPT.code, f"{len(where)} rows of {source.path} are not GRPO prompts (first: "
                                    f"{where[0]}): {problem}", "give each row a `prompt` (a string or a list of "
                                    "messages ending with a user turn), or pass --skip-invalid to drop them",
                                    severity=Severity.WARNING if skip_invalid else None, count=len(where)))
        reports.append(report)
    for what, where in refused.items():
        findings.append(finding(PROMPT_NOT_PASSED.code, f"{len(where)} GRPO prompts have {what} (first: {where[0]}): "
                                "TRL 1.16's GRPOTrainer passes text and images to the processor, not audio; tools need "
                                "its tool loop, which gemma4-tune does not run yet", f"drop the {what} (or those "
                                "rows), or train on them with SFT"))
    if not prompts and not any(f.severity is Severity.ERROR for f in findings):
        findings.append(finding(NO_PROMPTS.code, f"no usable GRPO prompt in {', '.join(s.path for s in sources)}",
                                "give rows a `prompt` column (docs/grpo.md)"))
    if any(f.severity is Severity.ERROR for f in findings):
        raise FindingError(*[f for f in findings if f.severity is Severity.ERROR])
    return prompts, reports, findings
