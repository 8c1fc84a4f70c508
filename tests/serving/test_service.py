"""The service behind every route: settings, limits and defaults, refusals counted once."""

from __future__ import annotations

import asyncio

import pytest

import stillhouse
from monitoring.catalog import BASE_ADAPTER_LABEL, UNKNOWN_ADAPTER_LABEL
from serving.cli import serve_settings
from serving.engines.base import AdapterRef, SamplingParams
from serving.engines.torch_engine import TorchEngine
from serving.errors import ValidationError
from serving.protocol import lorax
from serving.registry import Registry
from serving.service import Call, ServerSettings, ServeSettings, Service, build_service


def test_serve_flags_become_settings(tmp_path):
    args = stillhouse.build_parser().parse_args([
        "serve", "--base", "tiny", "--registry", str(tmp_path), "--max-queue", "3", "--admin-token", "t",
        "--default-max-new-tokens", "7", "--request-log", str(tmp_path / "log.db"),
    ])  # fmt: skip
    server = ServerSettings(admin_token="t", default_max_new_tokens=7, request_log=tmp_path / "log.db")
    assert serve_settings(args) == ServeSettings(base="tiny", registry=tmp_path, max_queue=3, server=server)


def test_the_active_adapters_flag_and_its_deprecated_name(capsys):
    parser = stillhouse.build_parser()
    assert serve_settings(parser.parse_args(["serve"])).max_active_adapters == ServeSettings().max_active_adapters == 8
    assert serve_settings(parser.parse_args(["serve", "--max-active-adapters", "32"])).max_active_adapters == 32
    assert capsys.readouterr().err == ""
    assert serve_settings(parser.parse_args(["serve", "--max-resident-adapters", "3"])).max_active_adapters == 3
    assert "--max-resident-adapters is deprecated; use --max-active-adapters" in capsys.readouterr().err


def test_the_body_limit_flag(tmp_path):
    parser = stillhouse.build_parser()
    assert serve_settings(parser.parse_args(["serve", "--max-body-bytes", "2048"])).server.max_body_bytes == 2048
    assert serve_settings(parser.parse_args(["serve"])).server.max_body_bytes == ServerSettings().max_body_bytes == 1 << 20
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-body-bytes", "0"])


def test_settings_refuse_an_unknown_engine_and_a_stray_engine_url():
    with pytest.raises(ValueError, match="engine 'tensorrt' is not one of torch, vllm"):
        ServeSettings(engine="tensorrt")
    with pytest.raises(ValueError, match="engine='vllm'"):
        ServeSettings(engine_url="http://127.0.0.1:8000")


def test_build_service(tmp_path, tiny_base_dir):
    service = build_service(ServeSettings(base="tiny", registry=tmp_path, max_total_tokens=64, server=ServerSettings(profile="lorax")))
    assert isinstance(service.engine, TorchEngine) and service.engine.max_total_tokens == 64
    assert service.registry.root == tmp_path and service.settings.profile == "lorax"


@pytest.fixture(scope="module")
def service(tiny_base_dir, tmp_path_factory):
    """A service over an engine that is never started: ``prepare`` of the base needs no model."""
    engine = TorchEngine(tiny_base_dir, "tiny", max_total_tokens=64)
    return Service(engine, Registry(tmp_path_factory.mktemp("registry")), tiny_base_dir, ServerSettings(default_max_new_tokens=16))


def call(prompt: str, *, stop: tuple[str, ...] = (), max_new_tokens: int | None = None, truncate: int | None = None) -> Call:
    parameters = lorax.GenerateParameters()
    return Call("0" * 32, 0.0, "lorax", prompt, parameters, None, SamplingParams(stop=stop), max_new_tokens, truncate)


def refusals(service: Service, adapter: str) -> float:
    value = service.metrics.registry.get_sample_value("stillhouse_server_requests_total", {"adapter": adapter, "outcome": "validation"})
    return value or 0.0


def test_defaults_and_truncation(service):
    prepared = asyncio.run(service.prepare(call("one two three")))
    assert prepared.request.params.max_new_tokens == 16 and prepared.adapter_id == ""
    long = " ".join(["word"] * 80)
    prepared = asyncio.run(service.prepare(call(long, truncate=10)))
    assert len(prepared.request.prompt_ids) == 10
    ids = service.engine.tokenize(" ".join(["word"] * 55))
    assert 48 < len(ids) < 63
    assert service.fit(ids, None, None) == (ids, 64 - len(ids))  # the default shrinks to what the context leaves


@pytest.mark.parametrize(
    "kwargs, message, adapter",
    [
        ({"prompt": "x", "stop": tuple("abcde")}, "`stop` supports up to 4 stop sequences. Given: 5", UNKNOWN_ADAPTER_LABEL),
        ({"prompt": " ".join(["word"] * 80)}, "`inputs` must have less than 63 tokens", BASE_ADAPTER_LABEL),
        ({"prompt": "x", "max_new_tokens": 100}, r"`inputs` tokens \+ `max_new_tokens` must be <= 64", BASE_ADAPTER_LABEL),
    ],
)
def test_each_limit_is_refused_and_counted_once(service, kwargs, message, adapter):
    before = refusals(service, adapter)
    with pytest.raises(ValidationError, match=message):
        asyncio.run(service.prepare(call(**kwargs)))
    assert refusals(service, adapter) == before + 1


class _RecordingEngine:
    """An engine whose loads take a while and record what was in flight at once."""

    model_name = "tiny"

    def __init__(self):
        self.resident: list[str] = []
        self.in_flight: set[str] = set()
        self.most_in_flight = 0
        self.loads: list[str] = []

    def resident_adapters(self) -> list[str]:
        return list(self.resident)

    async def load_adapter(self, adapter) -> float:
        if adapter.adapter_id in self.resident:
            return 0.0
        self.in_flight.add(adapter.adapter_id)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        await asyncio.sleep(0.05)
        self.in_flight.discard(adapter.adapter_id)
        self.loads.append(adapter.adapter_id)
        self.resident.append(adapter.adapter_id)
        return 0.05


def test_different_adapters_load_at_once_and_one_adapter_loads_once(tiny_base_dir, tmp_path):
    engine = _RecordingEngine()
    service = Service(engine, Registry(tmp_path), tiny_base_dir, ServerSettings())
    a, b = AdapterRef("a@v1", tmp_path / "a"), AdapterRef("b@v1", tmp_path / "b")

    async def burst():
        await asyncio.gather(*(service.ensure_resident(adapter) for adapter in (a, b, a, b, a)))

    asyncio.run(burst())
    assert engine.most_in_flight == 2
    assert sorted(engine.loads) == ["a@v1", "b@v1"]
    assert service.metrics.registry.get_sample_value("stillhouse_server_adapter_load_seconds_count", {"adapter": "a@v1"}) == 1
