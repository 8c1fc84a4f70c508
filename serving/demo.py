"""`stillhouse demo`: start the server on a base model and ask it once per protocol.

Setup (provision the base, start the server) → run (one LoRAX call, one OpenAI completion,
one OpenAI chat, one raw HTTP call as curl would send it) → report what each answered.
"""

from __future__ import annotations

import argparse
import json

from serving.service import ServeSettings, build_service

FEW_SHOT = (
    "Review: The room was spotless and the staff were wonderful.\nSentiment: positive\n\n"
    "Review: The food arrived cold and the waiter was rude.\nSentiment: negative\n\n"
    "Review: It was fine, nothing special either way.\nSentiment: neutral\n\n"
    "Review: Absolutely loved the concert, best night of the year.\nSentiment: positive\n\n"
    "Review: The battery died after two days. Waste of money.\nSentiment: negative\n\n"
    "Review: The package came on Tuesday as scheduled.\nSentiment: neutral\n\n"
)


def sentiment_prompt(review: str) -> str:
    return f"{FEW_SHOT}Review: {review}\nSentiment:"


def run(args: argparse.Namespace, settings: ServeSettings) -> int:
    import httpx
    import lorax
    import openai

    from serving.loopback import ThreadedServer
    from serving.server import create_app

    # --- setup: the base model and a server on a free loopback port
    service = build_service(settings)
    server = ThreadedServer(create_app(service), host=args.host, port=args.port, start_timeout_s=None)
    try:
        server.start()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc
    url = server.url
    print(f"\nserver up at {url} with base {service.engine.model_name}\n")

    try:
        # --- run: one request per protocol
        review = "Lovely view and kind hosts, we will come back."
        prompt = sentiment_prompt(review)
        answer = lorax.Client(url).generate(prompt, max_new_tokens=2, stop_sequences=["\n"])
        print(f"[LoRAX, lorax-client]   {review!r} -> {answer.generated_text.strip()!r}"
              f"  ({answer.details.prompt_tokens} prompt tokens, finish: {answer.details.finish_reason.value})")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        review = "The screen cracked on day one and support never answered."
        completion = client.completions.create(model="", prompt=sentiment_prompt(review), max_tokens=2, temperature=0, stop=["\n"])
        print(f"[OpenAI completions]    {review!r} -> {completion.choices[0].text.strip()!r}")

        chat = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "Name a fruit that is yellow."}], max_tokens=12, temperature=0
        )
        print(f"[OpenAI chat]           'Name a fruit that is yellow.' -> {chat.choices[0].message.content.strip()!r}")

        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6}}
        raw = httpx.post(f"{url}/generate", json=body, timeout=120)
        print(f"[curl POST /generate]   'The capital of France is' -> {raw.json()['generated_text']!r}"
              f"  (x-total-time {raw.headers['x-total-time']} ms)")
        print(f"\ncurl {url}/generate -H 'content-type: application/json' -d '{json.dumps(body)}'")
    finally:
        # --- report done; stop what we started
        server.stop()
    return 0
