"""Incremental detokenization for streaming (TGI's prefix/read offsets).

Decoding token by token breaks characters that span several byte-fallback tokens, and
tokenizers whose decoders look at neighbours (leading spaces, byte fusing). Decoding a
short window and emitting only the text the newest token added, once it no longer ends in
an incomplete UTF-8 sequence, keeps every piece correct and makes the pieces concatenate
to the decoded whole.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids, one at a time, into the text each one completes."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window already emitted
        self._read_offset = 0  # end of the ids whose text has been emitted

    def push(self, token_id: int) -> str:
        """Add a token and return the new text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the end of generation)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]
