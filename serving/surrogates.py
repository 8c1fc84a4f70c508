"""Lone UTF-16 surrogates: JSON's ``"\\ud800"`` decodes to a Python str that no UTF-8 encoder accepts.

A request may carry them; nothing downstream (tokenizers, databases, JSON answers) can hold them,
so the wire models refuse them and what must store or echo such text replaces them with U+FFFD.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def has_surrogates(text: str) -> bool:
    """``text`` holds a code point UTF-8 cannot encode."""
    return _SURROGATE.search(text) is not None


def replace_surrogates(text: str) -> str:
    """``text`` with every surrogate code point replaced by U+FFFD."""
    return _SURROGATE.sub(REPLACEMENT, text)
