"""Teacher labelling against the real server (tiny base) through lorax-client and the openai client."""

from __future__ import annotations

import pytest

from serving.loopback import free_port
from training.config import EndpointConfig
from training.endpoint import Endpoint, EndpointError
from training.labelling import label
from training.row import Row
from training.task import load_task
from tests.serving.server_harness import running_server

TASK = load_task("demo")


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    with running_server(tiny_base_dir, tmp_path_factory.mktemp("registry")) as (url, _):
        yield url


def rows(n):
    return [Row(id=f"r{i}", inputs={"review": f"The desk number {i} was fine."}) for i in range(n)]


@pytest.mark.parametrize("protocol", ["lorax", "openai"])
def test_labelling_is_cached_and_resumes(server, tmp_path, protocol):
    url = server if protocol == "lorax" else f"{server}/v1"
    teacher = Endpoint(EndpointConfig(url=url, protocol=protocol, concurrency=3))
    cache = tmp_path / "cache.jsonl"
    labelled, report = label(rows(4), TASK, teacher, cache)
    assert (report.requested, report.cached, report.failed) == (4, 0, 0)
    assert all(row.output is not None and row.teacher == teacher.identity for row in labelled)
    assert report.mean_prompt_tokens > 60  # the few-shot teacher prompt

    # An interrupted run leaves a torn last line; the next run ignores it and asks only for what is missing.
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    again, report = label(rows(5), TASK, teacher, cache)
    assert (report.requested, report.cached) == (3, 2)
    assert [row.output for row in again[:4]] == [row.output for row in labelled]
    _, report = label(rows(5), TASK, teacher, cache)
    assert (report.requested, report.cached) == (0, 5)


def test_an_unreachable_teacher_fails_rows_after_retries(tmp_path):
    teacher = Endpoint(EndpointConfig(url=f"http://127.0.0.1:{free_port()}", retries=1, timeout_s=2))
    labelled, report = label(rows(2), TASK, teacher, tmp_path / "cache.jsonl")
    assert report.failed == 2
    assert all(row.output is None and "label_error" in row.to_json() for row in labelled)
    with pytest.raises(EndpointError):
        teacher.complete("x", TASK.generation)


@pytest.mark.parametrize("protocol", ["lorax", "openai"])
def test_labelling_with_top_k_stores_the_teachers_distribution(server, tmp_path, protocol):
    url = server if protocol == "lorax" else f"{server}/v1"
    teacher = Endpoint(EndpointConfig(url=url, protocol=protocol, concurrency=2))
    cache = tmp_path / "cache.jsonl"
    plain, _ = label(rows(2), TASK, teacher, cache)
    assert all(isinstance(row.teacher_logprob, float) for row in plain)
    if protocol == "lorax":
        assert all(row.teacher_tokens for row in plain)
    assert all("teacher_top_logprobs" not in row.to_json() for row in plain)

    # answers cached without top-k are not reused for distillation; rows lacking it are asked again
    labelled, report = label(plain, TASK, teacher, cache, top_k=3)
    assert (report.requested, report.cached) == (2, 0)
    for row, before in zip(labelled, plain):
        assert row.output == before.output
        tokens, tops = row.teacher_tokens, row.teacher_top_logprobs
        assert tokens and len(tops) == len(tokens)
        for token, top in zip(tokens, tops):
            assert 1 <= len(top) <= 3 and all(isinstance(i, int) for i, _ in top)
            assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            assert top[0][0] == token  # greedy: the generated token is the teacher's best
        assert row.teacher_logprob == pytest.approx(sum(top[0][1] for top in tops), abs=1e-5)
        assert row.teacher_logprob == pytest.approx(before.teacher_logprob, abs=1e-5)
    again, report = label(labelled, TASK, teacher, cache, top_k=3, relabel=True)
    assert (report.requested, report.cached) == (0, 2)
    assert again == labelled
