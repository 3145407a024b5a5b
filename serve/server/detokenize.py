"""Token ids -> text deltas, and stop strings checked on that text.

Runs on the asyncio side, not in the engine thread: detokenising overlaps the next forward pass (torch releases
the GIL), and a stop string found here ends the request through an abort carrying the stop position.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas whose concatenation equals ``decode(all ids)``.

    Only a short window is decoded each time (the tokens since the last emitted delta, with the previous
    batch as context), so a long answer costs O(n), not O(n^2). While the window ends in an incomplete UTF-8
    character, nothing is emitted: the next token completes it.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: context for the tokens after read_offset
        self._read_offset = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids) -> str:
        """Append tokens; return the new text they complete (possibly empty)."""
        self.token_ids.extend(token_ids)
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.token_ids[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as decoded."""
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.token_ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return text[len(prefix):] if text.startswith(prefix) else ""


class StopStrings:
    """Finds the first stop string completed in streamed text; the output ends just before it.

    Text that might be the start of a stop string is held back (up to the longest stop string less one
    character) until the next delta shows whether it is, so a stream never emits part of a stop string.
    ``include``: the output ends just after the stop string instead (vLLM's ``include_stop_str_in_output``).
    """

    def __init__(self, stops: list[str], *, include: bool = False) -> None:
        self.stops = list(stops)
        self.include = include
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self._num_sent = 0
        self.stopped = False

    def feed(self, delta: str, *, armed: bool = True) -> str:
        """Add generated text; return what can be sent now. Sets ``stopped`` when a stop string appears; not
        ``armed`` (an answer still short of its min_tokens, as vLLM), no stop string is looked for in it."""
        assert not self.stopped, "feed after a stop string was found"
        self.text += delta
        if not armed:
            return self._take(len(self.text))
        # A new match starts at or after the sent text (anything earlier would have been found before). The
        # first stop string to be completed wins, so the result does not depend on how the text was split.
        hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, self._num_sent)) >= 0]
        if hits:
            self.stopped = True
            end, start = min(hits)
            self.text = self.text[: end if self.include else start]
            return self._take(len(self.text))
        return self._take(max(self._num_sent, len(self.text) - self._hold))

    def flush(self) -> str:
        """At the end of generation nothing is held back any more."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self._num_sent:end]
        self._num_sent = max(self._num_sent, end)
        return out
