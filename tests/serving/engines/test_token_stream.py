"""The stop rules and text pieces both engines share."""

from __future__ import annotations

import pytest

from serving.engines.base import SamplingParams
from serving.engines.model_text import ModelText, text_config
from serving.engines.token_stream import TokenStream, finish_reason

EOS = frozenset({1})


@pytest.mark.parametrize(
    "params, token_id, generated, text, piece, expected",
    [
        (SamplingParams(max_new_tokens=5), 1, 1, "", "", "eos_token"),
        (SamplingParams(max_new_tokens=5, ignore_eos_token=True), 1, 1, "", "", None),
        (SamplingParams(max_new_tokens=5, ignore_eos_token=True), 1, 5, "", "", "length"),
        (SamplingParams(max_new_tokens=5, stop=("\n\n",)), 7, 2, "a\n\n", "\n", "stop_sequence"),
        (SamplingParams(max_new_tokens=5, stop=("\n\n",)), 7, 2, "a\n", "\n", None),
        # a match that ended before this piece is not new
        (SamplingParams(max_new_tokens=5, stop=("ab",)), 7, 3, "abcdef", "ef", None),
    ],
)
def test_finish_reason(params, token_id, generated, text, piece, expected):
    assert finish_reason(params, EOS, token_id, generated, text, piece) == expected


def test_pieces_concatenate_to_the_text_and_the_result_reports_the_stop(tiny_base_dir):
    text = ModelText(tiny_base_dir, text_config(tiny_base_dir))
    ids = text.tokenize("Ünïcödé café, and more words", add_special_tokens=False)
    stream = TokenStream(text, SamplingParams(max_new_tokens=len(ids)), frozenset())
    pieces = [stream.push(token_id, -0.5).text for token_id in ids]
    assert stream.finish_reason == "length"
    assert "".join(pieces) == stream.text == text.decode(ids)
    result = stream.result(prompt_tokens=3, seed=None, prefill=[], enqueued_at=stream.first_token_at)
    assert (result.generated_text, result.generated_tokens, result.finish_reason) == (stream.text, len(ids), "length")
    assert result.queue_time_s == 0.0 and result.total_time_s >= result.time_to_first_token_s >= 0


def test_the_upstream_reason_counts_only_when_no_rule_of_ours_stops_first(tiny_base_dir):
    text = ModelText(tiny_base_dir, text_config(tiny_base_dir))
    stream = TokenStream(text, SamplingParams(max_new_tokens=1), frozenset())
    stream.push(5, 0.0, upstream_finish="stop_sequence")
    assert stream.finish_reason == "length"
    stream = TokenStream(text, SamplingParams(max_new_tokens=4), frozenset())
    stream.push(5, 0.0, upstream_finish="eos_token")
    assert stream.finish_reason == "eos_token"
