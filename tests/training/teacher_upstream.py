"""A teacher with a known weakness, speaking the LoRAX (``POST /``) and OpenAI (``/v1/completions``) protocols.

It reads the last review of a prompt and answers its sentiment from the demo generator's
adjectives, but where the answer is ``neutral`` it says ``so-so`` (not a label) unless the
request constrains the answer to the labels (``guided_choice`` on OpenAI, a ``response_format``
JSON schema on LoRAX, answered as ``{"label": ...}``): the teacher that never says neutral, and
the constraint that fixes it. Every request body is kept, so tests count requests and read what was sent.
"""

from __future__ import annotations

import json
import re
import threading

from fastapi import FastAPI, Request

from training.tasks.sentiment_data import _VOCABULARY


def _lexicon() -> dict[str, str]:
    words = {}
    for vocabulary in _VOCABULARY.values():
        for label, adjectives in vocabulary["adjectives"].items():
            for adjective in adjectives:
                words[adjective] = label
    return words


LEXICON = _lexicon()


class StandInTeacher:
    def __init__(self):
        self.bodies: list[dict] = []
        self._lock = threading.Lock()

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def answer(self, prompt: str, choices: list[str] | None, schema: bool) -> str:
        review = prompt.rsplit("Review:", 1)[-1].split("\n", 1)[0].lower()
        label = next((LEXICON[phrase] for phrase in sorted(LEXICON, key=len, reverse=True) if re.search(rf"\b{re.escape(phrase)}\b", review)), "neutral")
        if schema:
            return json.dumps({"label": label})
        if choices:
            return label if label in choices else choices[0]
        return " so-so" if label == "neutral" else f" {label}"

    def app(self) -> FastAPI:
        app = FastAPI()

        def keep(body: dict) -> None:
            with self._lock:
                self.bodies.append(body)

        @app.post("/")
        async def generate(request: Request):
            body = await request.json()
            keep(body)
            parameters = body.get("parameters") or {}
            text = self.answer(body["inputs"], None, parameters.get("response_format") is not None)
            details = {"finish_reason": "stop_sequence", "prompt_tokens": len(body["inputs"].split()), "generated_tokens": 1,
                       "prefill": [], "tokens": [{"id": 7, "text": text, "logprob": -0.5, "special": False}]}
            return [{"generated_text": text, "details": details}]

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            keep(body)
            text = self.answer(body["prompt"], body.get("guided_choice"), False)
            return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body.get("model") or "teacher",
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": 1, "total_tokens": 1}}

        return app
