"""Structured output through `stillhouse serve --engine vllm`: the torch engine's protocol tests, unchanged.

The constraint is compiled (and refused with a 422) by our server and passed to vLLM as its
``structured_outputs``; these tests check that what vLLM generates parses under it.
"""

from __future__ import annotations

import pytest

from tests.serving import test_structured_output as torch_structured
from tests.serving.engines.test_vllm_engine import adapters, served, server, vllm_venv  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


test_lorax_response_format_schema_always_parses = torch_structured.test_lorax_response_format_schema_always_parses
test_lorax_stream_under_a_schema = torch_structured.test_lorax_stream_under_a_schema
test_lorax_json_schema_type_over_raw_http = torch_structured.test_lorax_json_schema_type_over_raw_http
test_lorax_uncompilable_schema_is_422_naming_the_field = torch_structured.test_lorax_uncompilable_schema_is_422_naming_the_field
test_openai_json_schema_chat_and_completions = torch_structured.test_openai_json_schema_chat_and_completions
test_openai_json_object_is_an_object_or_cut_by_length = torch_structured.test_openai_json_object_is_an_object_or_cut_by_length
test_openai_guided_choice_streaming_and_not = torch_structured.test_openai_guided_choice_streaming_and_not
test_openai_guided_regex_and_structured_outputs = torch_structured.test_openai_guided_regex_and_structured_outputs
test_openai_bad_constraints_are_422_naming_the_field = torch_structured.test_openai_bad_constraints_are_422_naming_the_field
