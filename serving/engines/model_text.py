"""The base model's tokenizer as every engine uses it.

Engines tokenize prompts and detokenize outputs with this one object, so the same request
gives the same ids and the same text whichever engine runs the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from serving import base_models
from serving.engines.base import Alternative, PrefillToken


def text_config(base_dir: Path) -> PretrainedConfig:
    """The config of the base model's text decoder (the whole config for a text-only model)."""
    return AutoConfig.from_pretrained(base_dir).get_text_config(decoder=True)


class ModelText:
    """Tokenizer, end-of-sequence ids and chat template of one base model."""

    def __init__(self, base_dir: Path, config: PretrainedConfig):
        self.tokenizer = base_models.load_tokenizer(base_dir)
        #: generated tokens that end a generation (tokenizer and generation config)
        self.eos_token_ids = self._find_eos_ids(base_dir, config)
        self.special_ids = frozenset(i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special)

    def _find_eos_ids(self, base_dir: Path, config: PretrainedConfig) -> frozenset[int]:
        try:
            generation_config = GenerationConfig.from_pretrained(base_dir)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        ids = {self.tokenizer.eos_token_id}
        configured = generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return frozenset(i for i in ids if i is not None)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (with BOS when the model uses one)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """Text for ``ids``, special tokens skipped, spacing left exactly as decoded."""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, special tokens included."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def alternatives(self, ranked: Iterable[tuple[int, float]]) -> tuple[Alternative, ...]:
        """``Alternative``s, with their text, for ``(token id, logprob)`` pairs in the given order."""
        return tuple(Alternative(id=token_id, text=self.token_text(token_id), logprob=logprob) for token_id, logprob in ranked)

    def prefill_tokens(self, prompt_ids: list[int], logprobs: Sequence[float | None]) -> list[PrefillToken]:
        """The prompt tokens with their text and log-probabilities; the first has none (nothing precedes it)."""
        return [
            PrefillToken(id=token_id, text=self.token_text(token_id), logprob=logprob if position else None)
            for position, (token_id, logprob) in enumerate(zip(prompt_ids, logprobs))
        ]

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt for a chat, ending where the assistant's reply starts.

        Like every prompt, it is meant for ``tokenize`` with special tokens, so a BOS the
        template writes itself is left out (it would be doubled).
        """
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            bos = self.tokenizer.bos_token
            if bos and prompt.startswith(bos) and self.tokenize("")[:1] == [self.tokenizer.bos_token_id]:
                prompt = prompt[len(bos) :]
            return prompt
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return f"{turns}assistant:"
