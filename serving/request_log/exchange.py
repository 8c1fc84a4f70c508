"""The request log's rows: an exchange (one request and its answer) and feedback keyed by request id."""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from dataclasses import dataclass, field

from serving.surrogates import has_surrogates, replace_surrogates


def new_request_id() -> str:
    """A fresh request id (32 hex characters)."""
    return uuid.uuid4().hex


def hash_unit(unit: str, salt: str = "") -> str:
    """The stored form of a unit id (user, session): a salted sha256, never the raw value."""
    return hashlib.sha256(f"{salt}\x00{unit}".encode()).hexdigest()[:32]


@dataclass
class Exchange:
    """One request and its answer, as served by the server or the router."""

    request_id: str
    prompt: str
    protocol: str  # lorax | openai_completions | openai_chat
    source: str = "server"  # server | router
    ts: float = field(default_factory=time.time)
    route: str | None = None
    arm: str | None = None
    adapter: str | None = None
    template_version: str | None = None
    config_version: str | None = None
    output: str | None = None
    parameters: dict = field(default_factory=dict)
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    status: int = 200
    outcome: str = "success"
    unit_hash: str | None = None
    fallback_from: str | None = None  # the arm whose upstream failed before this one answered
    shadow_of: str | None = None  # request id of the served exchange this shadow call mirrored
    shadow_agreement: bool | None = None


@dataclass
class Feedback:
    """A later judgement of an exchange (``metric`` as declared by its route)."""

    request_id: str
    metric: str
    value: float
    ts: float = field(default_factory=time.time)


@dataclass
class LoggedExchange:
    """An exchange read back, with its feedback: metric -> mean of the values given."""

    exchange: Exchange
    feedback: dict[str, float]


EXCHANGE_COLUMNS = [f.name for f in dataclasses.fields(Exchange)]


def without_surrogates(row: Exchange | Feedback) -> Exchange | Feedback:
    """``row`` with every lone surrogate (text no store can encode) replaced by U+FFFD; ``row`` itself when it holds none."""
    changes = {}
    for column in dataclasses.fields(row):
        value = getattr(row, column.name)
        replaced = _replaced(value)
        if replaced is not value:
            changes[column.name] = replaced
    return dataclasses.replace(row, **changes) if changes else row


def _replaced(value):
    """``value`` (text, or JSON made of text) with surrogates replaced; the very same object when it has none."""
    if isinstance(value, str):
        return replace_surrogates(value) if has_surrogates(value) else value
    if isinstance(value, dict):
        items = {_replaced(k): _replaced(v) for k, v in value.items()}
        same = len(items) == len(value) and all(a is b and items[a] is value[b] for a, b in zip(items, value))
        return value if same else items
    if isinstance(value, (list, tuple)):
        items = [_replaced(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value
