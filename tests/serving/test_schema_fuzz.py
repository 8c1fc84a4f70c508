"""A schema fuzz of every route of the inference server: no 5xx, and every refusal in the LoRAX error shape."""

from __future__ import annotations

import pytest

from serving.registry import Registry
from tests.lora_factory import make_lora_adapter
from tests.schema_fuzz import fuzz
from tests.serving.server_harness import running_server

ADMIN = "fuzz-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("fuzz")
    Registry(root / "registry").add(make_lora_adapter(tiny_base_dir, root / "alpha", r=8, seed=1), "alpha", base_dir=tiny_base_dir)
    # Short generations keep a few hundred cases quick; the limits themselves are fuzzed through the schema.
    with running_server(tiny_base_dir, root / "registry", admin_token=ADMIN, default_max_new_tokens=4, max_total_tokens=32,
                        request_log=root / "log.db") as (url, service):
        yield url, service


def test_no_route_answers_5xx_or_an_error_outside_the_lorax_shape(server):
    url, _ = server
    report = fuzz(url, headers={"Authorization": f"Bearer {ADMIN}"})
    print(report.summary())
    assert report.requests > 100
    assert not report.server_errors and not report.shape_violations, report.summary()
