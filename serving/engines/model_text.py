"""The base model's tokenizer as every engine uses it.

Engines tokenize prompts and detokenize outputs with this one object, so the same request
gives the same ids and the same text whichever engine runs the model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, PretrainedConfig

from serving import base_models


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
