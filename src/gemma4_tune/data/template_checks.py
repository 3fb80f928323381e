"""What the chat template does to a run's own data, checked on its rendered and encoded examples.

Three silent failures of the failure catalog, each reported once per run with a count:

* row 29: a supervised model turn whose closing ``<turn|>`` is not supervised (cut by ``--max-seq-len``,
  left out by the data's weights, or outside the template's generation markers) never teaches the model
  to stop: G4T320 when some turns lose it, G4T321 when none keeps it;
* row 35: reasoning the template revision does not render is never trained (G4T322);
* row 13: a turn rendered in a context its generation prompt never produces (G4T323).

``template_findings`` runs them right after the batcher has encoded the training examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gemma4_tune.data.chat import (
    END_OF_TURN,
    KNOWN_PROMPT_MISMATCHES,
    REASONING_RENDERED,
    REVISIONS,
    dropped_reasoning,
    prompt_mismatch,
)
from gemma4_tune.data.collate import IGNORE_INDEX, _messages_and_tools
from gemma4_tune.findings import Finding, Severity, finding, register

END_OF_TURN_PARTLY_LOST = register("G4T320", Severity.WARNING, "Model turns whose end-of-turn is not learned", (29,))
END_OF_TURN_NEVER_LEARNED = register("G4T321", Severity.ERROR, "No model turn learns its end-of-turn", (29,))
REASONING_NOT_RENDERED = register("G4T322", Severity.WARNING, "Reasoning not rendered by this template revision",
                                  (35,))
PROMPT_MISMATCH = register("G4T323", Severity.WARNING, "Model turns rendered unlike their generation prompt", (13,))

MODEL_HEADER = "<|turn>model"
START_OF_TURN = "<|turn>"


@dataclass(frozen=True)
class TurnEnds:
    """Supervised model turns of encoded examples and why some do not learn their ``<turn|>``.

    ``cut``: the turn runs into the end of a truncated example; ``unlabelled``: its ``<turn|>`` is there
    but carries no label (weights, ``roles_to_train``, generation markers); ``first``: the example index
    of the first such turn (None when every turn learns its end).
    """

    supervised: int
    cut: int
    unlabelled: int
    first: int | None

    @property
    def lost(self) -> int:
        """Supervised turns whose end-of-turn is not learned."""
        return self.cut + self.unlabelled


def model_header_ids(tokenizer: Any) -> list[int]:
    """Token ids that open a model turn (``<|turn>model``), as the tokenizer splits them before the newline."""
    enc = tokenizer(MODEL_HEADER + "\n", add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (_, end) in zip(enc["input_ids"], enc["offset_mapping"]) if end <= len(MODEL_HEADER)]


def turn_ends(examples: Sequence[dict[str, Any]], tokenizer: Any) -> TurnEnds:
    """Count the supervised model turns of ``examples`` (``Gemma4Batcher.encode`` output) and the ends they lose.

    A model turn runs from ``<|turn>model`` to its ``<turn|>``; one that reaches the next ``<|turn>`` without
    it has lost it too. One that reaches the end of an example untruncated is waiting for tool results (the
    template closes it later) and is not counted.
    """
    header = model_header_ids(tokenizer)
    start_id, end_id = tokenizer.convert_tokens_to_ids([START_OF_TURN, END_OF_TURN])
    supervised = cut = unlabelled = 0
    first = None
    for index, example in enumerate(examples):
        ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
        n = len(ids)
        for at in (i for i in range(n - len(header) + 1) if ids[i : i + len(header)] == header):
            stop = next((j for j in range(at + 1, n) if ids[j] in (start_id, end_id)), n)
            closed = stop < n and ids[stop] == end_id
            if not any(label != IGNORE_INDEX for label in labels[at : stop + closed]):
                continue
            if closed and labels[stop] != IGNORE_INDEX:
                supervised += 1
                continue
            if not closed and stop == n and not example["truncated"]:
                continue
            supervised += 1
            if stop == n:
                cut += 1
            else:
                unlabelled += 1
            first = index if first is None else first
    return TurnEnds(supervised, cut, unlabelled, first)


def end_of_turn_findings(ends: TurnEnds, sources: Sequence[str], revision: str, max_seq_len: int) -> list[Finding]:
    """G4T321 when no supervised model turn learns its ``<turn|>``, else G4T320 when some do not."""
    if not ends.lost:
        return []
    why = []
    if ends.cut:
        why.append(f"{ends.cut} cut off by --max-seq-len {max_seq_len}")
    if ends.unlabelled:
        why.append(f"{ends.unlabelled} whose {END_OF_TURN} has no label (the turn's last assistant message has weight "
                   f"0 or a role outside roles_to_train, or the training template {revision} leaves it outside its "
                   "generation markers)")
    counts = f"{'; '.join(why)} (the first: {sources[ends.first]})"
    fix = ("give the last assistant message of every trained model turn weight 1 (the turn's <turn|> belongs to it; "
           "with tool calls, the answer after the tool results closes the turn), raise --max-seq-len for the cut "
           "rows, and train with an official --template-revision (v1-v5)")
    details = {"turns": ends.supervised, "lost": ends.lost, "cut": ends.cut, "unlabelled": ends.unlabelled,
               "first_row": sources[ends.first]}
    if ends.lost == ends.supervised:
        return [finding(END_OF_TURN_NEVER_LEARNED.code, f"none of the {ends.supervised} supervised model turns learns "
                        f"its closing {END_OF_TURN}: {counts}; the model would never learn to stop generating", fix,
                        **details)]
    return [finding(END_OF_TURN_PARTLY_LOST.code, f"{ends.lost} of {ends.supervised} supervised model turns do not "
                    f"learn their closing {END_OF_TURN}: {counts}; trained on such turns, the model learns to run on "
                    "instead of stopping", fix, **details)]


def _chat_kwargs(batcher: Any) -> dict[str, Any]:
    return {**dict(batcher.tokenizer.special_tokens_map), **batcher.chat_kwargs}


def reasoning_findings(conversations: Sequence[Any], revision: str, kwargs: dict[str, Any]) -> list[Finding]:
    """G4T322: rows with assistant reasoning that ``revision`` does not render, and which revisions would."""
    dropped: list[tuple[Any, list[dict], list[dict] | None]] = []
    with_reasoning = 0
    for conv in conversations:
        if getattr(conv, "text", None) is not None:
            continue
        messages, tools = _messages_and_tools(conv)
        if not any(m.get("reasoning_content") for m in messages if m.get("role") == "assistant"):
            continue
        with_reasoning += 1
        if dropped_reasoning(messages, revision=revision, tools=tools, **kwargs):
            dropped.append((conv, messages, tools))
    if not dropped:
        return []
    rendering = [rev for rev in REVISIONS if rev != revision and all(
        not dropped_reasoning(messages, revision=rev, tools=tools, **kwargs) for _, messages, tools in dropped)]
    others = (f"train and serve with --template-revision {' or '.join(rendering)}, which renders it in all of them"
              if rendering else "no official revision renders it in all of them")
    return [finding(
        REASONING_NOT_RENDERED.code,
        f"{len(dropped)} of {with_reasoning} training rows with reasoning (reasoning_content, reasoning or thinking) "
        f"have assistant turns whose reasoning chat template {revision} does not render, so it is not trained "
        f"(where {revision} renders reasoning: {REASONING_RENDERED[revision]}; the first: {dropped[0][0].source})",
        f"{others}; or drop the reasoning from those rows (as they are, it is not trained)",
        rows=len(dropped), revision=revision, first_row=dropped[0][0].source, rendering_revisions=rendering,
    )]


def prompt_mismatch_findings(conversations: Sequence[Any], revision: str, kwargs: dict[str, Any]) -> list[Finding]:
    """G4T323: rows with a trained assistant message that does not start with its own generation prompt."""
    hits: list[tuple[Any, int, Any]] = []
    for conv in conversations:
        if getattr(conv, "text", None) is not None:
            continue
        messages, tools = _messages_and_tools(conv)
        for i, message in enumerate(messages):
            if i == 0 or message.get("role") != "assistant" or message.get("train") is False:
                continue
            found = prompt_mismatch(messages[: i + 1], revision=revision, tools=tools, **kwargs)
            if found is not None:
                hits.append((conv, i, found))
                break
    if not hits:
        return []
    conv, index, first = hits[0]
    known = next((k for k in KNOWN_PROMPT_MISMATCHES if (k.outcomes[revision] or ("",))[0] == first.prompt), None)
    case = f"known case {known.case}: {known.condition}; " if known else ""
    consistent = [rev for rev in REVISIONS if known is not None and known.outcomes[rev] is None]
    reshape = "merge consecutive assistant messages into one" if known and known.case == "consecutive_assistant" \
        else "reshape those rows out of that case"
    fix = (f"train and serve with --template-revision {' or '.join(consistent)}, which renders this case "
           f"consistently, or {reshape}" if consistent else reshape)
    return [finding(
        PROMPT_MISMATCH.code,
        f"{len(hits)} of {len(conversations)} training rows have an assistant turn that chat template {revision} "
        f"renders unlike its generation prompt ({case}the first: {conv.source}, message {index}: at inference the "
        f"prompt ends with {first.prompt!r}, training renders {first.rendered[:40]!r}): the model is trained in a "
        "context it never sees when it answers",
        fix, rows=len(hits), revision=revision, first_row=conv.source, case=known.case if known else None,
    )]


def template_findings(batcher: Any, conversations: Sequence[Any], examples: Sequence[dict[str, Any]]) -> list[Finding]:
    """G4T320-G4T323 for a run's training conversations and their encoded examples (same order)."""
    sources = [getattr(c, "source", f"row {i + 1}") for i, c in enumerate(conversations)]
    kwargs = _chat_kwargs(batcher)
    return [
        *end_of_turn_findings(turn_ends(examples, batcher.tokenizer), sources, batcher.revision, batcher.max_seq_len),
        *reasoning_findings(conversations, batcher.revision, kwargs),
        *prompt_mismatch_findings(conversations, batcher.revision, kwargs),
    ]
