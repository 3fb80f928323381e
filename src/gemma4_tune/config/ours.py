"""gemma4-tune's own run files: every key is a RunConfig field (the flag's name), read as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gemma4_tune.config.options import RunConfig
from gemma4_tune.config.reader import Reader, Translation


class OwnReader(Reader):
    """Our own files: the keys are RunConfig's fields; anything else is refused by RunConfig with a did-you-mean."""

    dialect = "gemma4-tune"
    known = frozenset(RunConfig.model_fields)

    def claims(self, data: Mapping[str, Any]) -> bool:
        return True

    def translate(self, data: dict[str, Any], *, source: str) -> Translation:
        return Translation(source, self.dialect, "`gemma4-tune train --help`", values=dict(data))


READER = OwnReader()
