"""Structured output: a grammar the generated text must follow, compiled once and applied token by token.

The protocol layers turn ``response_format`` (LoRAX, OpenAI) and vLLM's ``guided_*`` /
``structured_outputs`` into one ``ConstraintSpec``; ``Grammars.compile`` turns a spec into a
``Constraint`` (a 422 naming the field when it cannot compile); an engine either applies
``Constraint.matcher()`` per sequence (mask the logits row, then accept the chosen token) or hands
``ConstraintSpec.vllm()`` to vLLM. xgrammar is the grammar engine because vLLM uses it too, so both
engines constrain with the same compiler and the same JSON-schema semantics. Once the grammar is
complete the mask allows only end-of-sequence tokens, so the usual stop rules end the generation;
``max_new_tokens`` can still cut it short (finish reason ``length``, as in vLLM and OpenAI).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import xgrammar

from serving.errors import ValidationError

if TYPE_CHECKING:
    from serving.engines.model_text import ModelText

ConstraintKind = Literal["json_schema", "regex", "choice"]

#: the schema OpenAI's and vLLM's ``json_object`` mean: any JSON object
ANY_OBJECT_SCHEMA = '{"type": "object"}'

#: compact JSON, no free whitespace (a small model can pad whitespace until max_new_tokens); vLLM's
#: ``disable_any_whitespace`` compiles the same
JSON_SEPARATORS = (",", ":")

#: compiled grammars kept per server, least recently used dropped first
MAX_CACHED_GRAMMARS = 256

_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# xgrammar prefixes its C++ errors with a time and a source location
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match: a JSON schema (as JSON text), a regex, or one of some strings.

    ``field`` is the request field it came from, named in errors; it is not part of the grammar.
    """

    kind: ConstraintKind
    payload: str | tuple[str, ...]
    field: str = field(default="response_format", compare=False)

    @classmethod
    def json_schema(cls, schema: dict | None, field: str) -> ConstraintSpec:
        """A JSON-schema constraint; ``None`` means any JSON object."""
        return cls("json_schema", ANY_OBJECT_SCHEMA if schema is None else json.dumps(schema), field)

    @classmethod
    def regex(cls, pattern: str, field: str) -> ConstraintSpec:
        """Text matching the regular expression ``pattern`` in full."""
        return cls("regex", pattern, field)

    @classmethod
    def choice(cls, options: list[str], field: str) -> ConstraintSpec:
        """Exactly one of ``options``."""
        return cls("choice", tuple(options), field)

    def grammar(self) -> str:
        """The EBNF of a choice (vLLM's ``choice_as_grammar``, so both engines build the same grammar)."""
        escape = lambda s: "".join(_EBNF_ESCAPES.get(c, c if ord(c) >= 0x20 and ord(c) != 0x7F else f"\\u{ord(c):04x}") for c in s)
        return "root ::= " + " | ".join(f'"{escape(option)}"' for option in self.payload)

    def vllm(self) -> dict:
        """The constraint as vLLM's ``structured_outputs`` request field."""
        if self.kind == "json_schema":
            return {"json": json.loads(self.payload)}
        if self.kind == "regex":
            return {"regex": self.payload}
        return {"choice": list(self.payload)}


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled ``ConstraintSpec``, shared by every request that sends the same one."""

    spec: ConstraintSpec
    compiled: xgrammar.CompiledGrammar
    vocab_size: int

    def matcher(self) -> TokenMatcher:
        """A fresh per-request matcher at the start of the grammar."""
        return TokenMatcher(self)


class TokenMatcher:
    """One generation's position in its grammar: which tokens may come next."""

    def __init__(self, constraint: Constraint):
        self._matcher = xgrammar.GrammarMatcher(constraint.compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, constraint.vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place (a 1-D float row)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        with torch.inference_mode():  # engine logits are inference tensors
            xgrammar.apply_token_bitmask_inplace(logits, bitmask[0])

    def accept(self, token_id: int) -> None:
        """Advance past the chosen token; a token the mask forbade is a bug, reported as such."""
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} does not follow the grammar")

    @property
    def complete(self) -> bool:
        """Whether the grammar has been matched to its end."""
        return self._matcher.is_terminated()


class Grammars:
    """The grammar compiler for one served model, and its cache of compiled constraints.

    Special tokens other than the end-of-sequence ones are never allowed under a constraint:
    the text a client gets skips them, so they would break the grammar unseen.
    """

    def __init__(self, text: ModelText, vocab_size: int):
        stop = sorted(text.eos_token_ids)
        detected = xgrammar.TokenizerInfo.from_huggingface(text.tokenizer, vocab_size=vocab_size, stop_token_ids=stop)
        vocab = [""] * vocab_size  # xgrammar never allows an empty token
        for token, token_id in text.tokenizer.get_vocab().items():
            if token_id < vocab_size and (token_id not in text.special_ids or token_id in text.eos_token_ids):
                vocab[token_id] = token
        info = xgrammar.TokenizerInfo(
            vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=stop, add_prefix_space=detected.add_prefix_space
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._vocab_size = vocab_size
        self._cache: OrderedDict[ConstraintSpec, Constraint] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """The compiled constraint for ``spec`` (cached); ``ValidationError`` naming its field if it cannot compile."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if spec.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(spec.payload, any_whitespace=False, separators=JSON_SEPARATORS)
            elif spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.payload)
            else:
                compiled = self._compiler.compile_grammar(spec.grammar())
        except RuntimeError as error:
            reason = _XGRAMMAR_PREFIX.sub("", str(error).strip().splitlines()[0])
            what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list"}[spec.kind]
            raise ValidationError(f"`{spec.field}`: the {what} cannot be compiled: {reason}") from error
        constraint = Constraint(spec, compiled, self._vocab_size)
        with self._lock:
            self._cache[spec] = constraint
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return constraint
