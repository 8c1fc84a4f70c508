"""Run the router and echo upstreams on free loopback ports inside the test process."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from abtest.router import Router, RouterSettings, create_app
from serving.loopback import ThreadedServer


def running(app) -> ThreadedServer:
    """A server for ``app`` that stops within a second, as a killed upstream would; enter it to start it."""
    return ThreadedServer(app, start_timeout_s=30, graceful_shutdown_s=1, stop_timeout_s=15)


@contextmanager
def running_router(config_path: Path, **settings):
    """Start the router on ``config_path``; yield (url, router)."""
    router = Router(RouterSettings(config_path=config_path, reload_interval_s=0.1, **settings))
    with running(create_app(router)) as app:
        yield app.url, router


def fragile(app, delay_s: list[float] | None = None):
    """``app`` with a server's bugs on its inputs: a seed >= 2**64 answers a plain 500 (as an unchecked
    sampler would), ``"inputs": "invalid"`` a 422; ``delay_s[0]`` seconds pass before each answer."""
    import asyncio
    import json

    from fastapi import Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    @app.middleware("http")
    async def bugs(request: Request, call_next):
        if delay_s and delay_s[0]:
            await asyncio.sleep(delay_s[0])
        body = json.loads(await request.body() or b"{}")
        sampling = body.get("parameters") or body
        if isinstance(sampling.get("seed"), int) and sampling["seed"] >= 2**64:
            return PlainTextResponse("Internal Server Error", status_code=500)
        if body.get("inputs") == "invalid" or body.get("prompt") == "invalid":
            return JSONResponse({"error": "inputs: invalid", "error_type": "validation"}, status_code=422)
        return await call_next(request)

    return app


def dying_mid_stream(clean_end: bool = False):
    """An upstream whose streams send one event and then die (or, ``clean_end``, end without their last event)."""
    import json

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    lorax_event = {"token": {"id": 1, "text": "par", "logprob": 0.0, "special": False}, "generated_text": None, "details": None}
    openai_event = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "text": "par", "finish_reason": None, "logprobs": None}]}

    def stream(event: dict):
        async def body():
            yield f"data: {json.dumps(event)}\n\n".encode()
            if not clean_end:
                raise ConnectionResetError("the upstream died mid-stream")
        return StreamingResponse(body(), media_type="text/event-stream")

    for path in ("/", "/generate_stream"):  # lorax-client streams from `POST /`
        app.add_api_route(path, lambda: stream(lorax_event), methods=["POST"])
    app.add_api_route("/v1/completions", lambda: stream(openai_event), methods=["POST"])
    return app
