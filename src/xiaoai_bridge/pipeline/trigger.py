"""Which messages are questions, and what wake prefix to strip from them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal


class Trigger:
    """Applies the seed's prefix regex and, in keyword mode, the keyword filter."""

    def __init__(
        self, *, strip_regex: str, mode: Literal["all", "keyword"], keywords: Sequence[str] = ()
    ) -> None:
        self._strip = re.compile(strip_regex) if strip_regex else None
        self._mode = mode
        self._keywords = tuple(k for k in keywords if k)

    def apply(self, text: str, *, require_keyword: bool = True) -> str | None:
        """The question to ask, or None when the message is not for us.

        `require_keyword=False` (continuous conversation) answers without a keyword.
        """
        needs = require_keyword and self._mode == "keyword"
        if needs and not any(k in text for k in self._keywords):
            return None
        if self._strip is not None:
            # Like the seed (Go's ReplaceAllString): greedy, so it strips through the last match.
            text = self._strip.sub("", text)
        return text.strip()
