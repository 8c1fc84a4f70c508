"""Simulated users of the demo's route: they ask for a review's sentiment and score the answer.

Each user has a sticky id (``X-User-Id``), so the router keeps them on one arm. Half of them use
lorax-client, half the openai client, as real users would. The openai users read the router's
``x-request-id`` header and post ``correct`` (the answer matched the gold label) to
``POST /feedback``; lorax-client returns no response headers, so its users cannot name the
request they would score and send none. The openai users constrain the answer to the task's
labels (vLLM's ``guided_choice``, which the server enforces with a grammar), as a client that
needs a valid label would.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import lorax
import openai
from tqdm import tqdm

from training.task import Task

FEEDBACK_METRIC = "correct"
#: room for a label under ``guided_choice``: spelled without a leading space it can take several tokens
CHOICE_MAX_TOKENS = 8
_SCRAMBLE = 7919  # an odd prime: index -> user is a permutation of each block of `users` requests (users even)


@dataclass(frozen=True)
class Sent:
    """One simulated request and what became of it."""

    user: str
    client: str  # lorax or openai
    arm: str | None  # the arm that answered, when the client can see it (the x-stillhouse-arm header)
    gold: str
    label: str | None  # the parsed answer
    scored: bool  # feedback was posted and accepted
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SimulatedUsers:
    """``users`` users sending the task's generated reviews to ``route`` on the router at ``router_url``."""

    def __init__(self, router_url: str, task: Task, route: str, users: int, seed: int = 0):
        if users % 2:
            raise ValueError(f"users must be even (half use each client), not {users}")
        self.router_url = router_url.rstrip("/")
        self.task = task
        self.route = route
        self.users = users
        self._generator = importlib.import_module(task.generator)
        self._seed = seed
        self._sent = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=120)
        self._openai = openai.OpenAI(base_url=f"{self.router_url}/v1", api_key="demo", max_retries=0, timeout=120)

    def close(self) -> None:
        self._http.close()
        self._openai.close()

    def send(self, requests: int, concurrency: int, desc: str, until: float | None = None,
             stop: threading.Event | None = None) -> list[Sent]:
        """Send up to ``requests`` requests, ``concurrency`` at a time, until ``until`` (a time.time()) or ``stop``."""
        reviews = self._reviews(requests)
        progress = tqdm(total=requests, desc=desc, unit="req", file=sys.stderr, disable=not sys.stderr.isatty())

        def one(item: tuple[int, dict]) -> Sent | None:
            index, review = item
            if (until is not None and time.time() >= until) or (stop is not None and stop.is_set()):
                return None
            sent = self._ask(self.user_of(index), review)
            progress.update()
            return sent

        with ThreadPoolExecutor(concurrency) as pool:
            results = [sent for sent in pool.map(one, enumerate(reviews, start=self._sent)) if sent is not None]
        progress.close()
        return results

    def user_of(self, index: int) -> str:
        """Who sends request ``index``: the users take turns in a scrambled order, so the requests of one
        look come from many different users (the SRM check counts requests, which is sound only while
        users seldom repeat within a window). An odd multiplier keeps a request's parity, so clients
        alternate exactly."""
        return f"user-{index * _SCRAMBLE % self.users}"

    def _reviews(self, n: int) -> list[dict]:
        """The next ``n`` reviews of one endless generated stream (train vocabulary; the gold set is held out)."""
        with self._lock:
            start, self._sent = self._sent, self._sent + n
        return self._generator.generate("train", start + n, seed=self._seed)[start:]

    def _ask(self, user: str, review: dict) -> Sent:
        client = "openai" if int(user.rsplit("-", 1)[1]) % 2 == 0 else "lorax"
        generation = self.task.generation
        try:
            if client == "lorax":
                answer = lorax.Client(self.router_url, headers={"X-User-Id": user}, timeout=120).generate(
                    review["review"], adapter_id=self.route, max_new_tokens=generation.max_new_tokens,
                    stop_sequences=list(generation.stop),
                )
                return Sent(user, client, None, review["label"], self.task.parse(answer.generated_text).value, scored=False)
            raw = self._openai.completions.with_raw_response.create(
                model=self.route, prompt=review["review"], max_tokens=CHOICE_MAX_TOKENS, temperature=0,
                stop=list(generation.stop), extra_headers={"X-User-Id": user},
                extra_body={"guided_choice": list(self.task.output.labels)},  # the answer is always one of the labels
            )
            text = raw.parse().choices[0].text
        except (lorax.errors.GenerationError, openai.OpenAIError, httpx.HTTPError, OSError) as error:
            return Sent(user, client, None, review["label"], None, scored=False, error=f"{type(error).__name__}: {error}")
        label = self.task.parse(text).value
        score = {"request_id": raw.headers["x-request-id"], "metric": FEEDBACK_METRIC, "value": label == review["label"]}
        scored = self._http.post(f"{self.router_url}/feedback", json=score).status_code == 200
        return Sent(user, client, raw.headers.get("x-stillhouse-arm"), review["label"], label, scored)
