"""An upstream with a known quality: it answers a prompt's gold label with a set accuracy, after a set delay.

Prompts carry their gold label (``... gold=positive``) so the test client can score every answer
and post the score as feedback, as a user would: the effect an A/B test should find is injected
here, in the upstream, and nowhere else.
"""

from __future__ import annotations

import asyncio
import random

from fastapi import FastAPI, Request

LABELS = ("positive", "negative")


class Labeller:
    """Mutable knobs of one upstream: change ``delay_s`` mid-test to inject a latency regression."""

    def __init__(self, accuracy: float, delay_s: float = 0.0, seed: int = 0, garbage: float = 0.0):
        self.accuracy, self.delay_s, self.garbage = accuracy, delay_s, garbage
        self.random = random.Random(seed)

    def answer(self, prompt: str) -> str:
        """The gold label with probability ``accuracy``, else the other one; no label at all with probability ``garbage``."""
        if self.random.random() < self.garbage:
            return "I am not sure"
        gold = prompt.rsplit("gold=", 1)[-1].strip()
        wrong = next(label for label in LABELS if label != gold)
        return gold if self.random.random() < self.accuracy else wrong

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            text = self.answer(body["inputs"])
            return {"generated_text": text, "details": {"finish_reason": "stop", "prompt_tokens": len(body["inputs"].split()),
                                                        "generated_tokens": 1, "tokens": []}}

        return app
