"""Teacher client against a scripted OpenAI-compatible server over real loopback HTTP.

The server (tests/openai_test_server.py) stands in only for the external LLM; the client path
under test is the production one: openai.AsyncOpenAI, our retry policy, the SQLite cache.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import time
import types

import pytest

from data_tools._common import DataToolError
from data_tools.teacher import ReplyRejected, ResponseCache, TeacherClient, TeacherConfig, TeacherError, check_teacher
from data_tools.teacher.backoff import backoff_delay_s, retry_after_s
from data_tools.teacher.cache import request_key
from megatron_code.config_docs import undocumented_fields
from tests.openai_test_server import ScriptedTeacherServer

MESSAGES = [{"role": "user", "content": "# Task: oss_instruct\nSeed snippet: def f(): pass"}]


@pytest.fixture
def server():
    with ScriptedTeacherServer(models=["teacher-m"], sleep_s=3.0) as srv:
        yield srv


def config_for(server: ScriptedTeacherServer, **overrides) -> TeacherConfig:
    values = dict(name="t1", base_url=server.base_url, model="teacher-m", timeout_s=5.0, max_retries=6,
                  backoff_base_s=0.001, backoff_max_s=0.05, max_concurrency=4)
    values.update(overrides)
    return TeacherConfig(**values)


def needs_problem(text: str) -> str:
    """A minimal parser: accepts replies that contain a problem section."""
    if "## Problem" not in text:
        raise ReplyRejected("no ## Problem section")
    return text


async def ask_once(config: TeacherConfig, cache: ResponseCache | None = None, key: str = "item-1", parse=needs_problem):
    client = TeacherClient(config, cache)
    try:
        return await client.ask(MESSAGES, parse, key), client.stats
    finally:
        await client.aclose()


def test_retries_through_429_5xx_timeout_and_malformed_bodies(server):
    server.push("429", "500", "503", "sleep", "bad_json", "empty_choices", "ok")
    answer, stats = asyncio.run(ask_once(config_for(server, timeout_s=1.0)))
    assert answer.value.startswith("## Problem")
    assert stats["retries"] == 6 and stats["requests"] == 7
    assert server.counts["chat"] == 7


def test_gives_up_after_max_retries_with_clear_error(server):
    server.push("500", "503", "500", "ok")
    with pytest.raises(TeacherError) as excinfo:
        asyncio.run(ask_once(config_for(server, max_retries=2)))
    message = str(excinfo.value)
    assert "'t1'" in message and "gave up after 3 attempts" in message and "HTTP 500" in message
    assert "rerun to resume" in message
    assert server.counts["chat"] == 3  # the fourth directive was never asked for


def test_request_the_server_refuses_is_not_retried(server):
    with pytest.raises(TeacherError, match="refused the request: HTTP 404"):
        asyncio.run(ask_once(config_for(server, model="not-served")))
    assert server.counts["chat_unknown_model"] == 1


def test_unparseable_reply_is_asked_again_then_reported(server):
    server.push("unparseable", "ok")
    answer, stats = asyncio.run(ask_once(config_for(server)))
    assert stats["rejected_replies"] == 1 and "## Problem" in answer.text
    seeds = [body["seed"] for body in server.requests]
    assert seeds[0] != seeds[1], "a re-asked question must sample differently"

    server.push("unparseable", "unparseable")
    with pytest.raises(ReplyRejected, match="2 replies rejected, last because: no ## Problem section"):
        asyncio.run(ask_once(config_for(server, max_rejected_replies=1), key="item-2"))


def test_cache_makes_a_rerun_free_and_replays_rejections(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    server.push("unparseable", "ok")
    with ResponseCache(path) as cache:
        first, _ = asyncio.run(ask_once(config_for(server), cache))
    assert server.counts["chat"] == 2 and first.meta["cached"] is False
    with ResponseCache(path) as cache:  # a new process would reopen the file like this
        again, stats = asyncio.run(ask_once(config_for(server), cache))
        assert len(cache) == 2
    assert server.counts["chat"] == 2, "the rerun must not reach the server"
    assert again.text == first.text and again.meta["cached"] is True and stats["cache_hits"] == 2
    with ResponseCache(path) as cache:
        asyncio.run(ask_once(config_for(server, temperature=0.2), cache))
    assert server.counts["chat"] == 3, "other sampling parameters are another request"


def test_teacher_meta_and_sampling_parameters(server):
    config = config_for(server, temperature=0.3, top_p=0.9, max_tokens=512, seed=7, extra_params={"top_k": 20})
    answer, _ = asyncio.run(ask_once(config))
    usage = answer.meta["usage"]
    assert answer.meta["model"] == "teacher-m" and answer.meta["system_fingerprint"] == "fp_test_1"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    sent = server.requests[0]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["top_k"]) == (0.3, 0.9, 512, 20)
    assert sent["seed"] == TeacherClient(config).request_seed("item-1", 0)
    assert "seed" not in TeacherClient(config_for(server, seed=None)).config.sampling_params()


def test_concurrency_is_bounded_per_teacher(server):
    server.delay_s = 0.15
    config = config_for(server, max_concurrency=2)

    async def many():
        client = TeacherClient(config)
        try:
            await asyncio.gather(*(client.ask(MESSAGES, needs_problem, f"k{i}") for i in range(6)))
        finally:
            await client.aclose()

    asyncio.run(many())
    assert server.counts["chat"] == 6 and server.max_in_flight == 2


def test_preflight_names_the_problem(server, monkeypatch):
    assert asyncio.run(check_teacher(config_for(server))) == ["teacher-m"]
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    with pytest.raises(TeacherError, match="environment variable MY_TEACHER_KEY is not set"):
        asyncio.run(check_teacher(config_for(server, api_key_env="MY_TEACHER_KEY")))
    with pytest.raises(TeacherError, match=r"model 'other' is not served .* it serves teacher-m"):
        asyncio.run(check_teacher(config_for(server, model="other")))
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(TeacherError, match="cannot reach base_url .*is the server running"):
        asyncio.run(check_teacher(config_for(server, base_url=dead_url)))
    assert server.counts["chat"] == 0


def test_request_key_covers_the_whole_request():
    params = {"temperature": 0.7, "top_p": 0.95, "seed": 1}
    key = request_key("m", MESSAGES, params, 0)
    assert key == request_key("m", MESSAGES, dict(reversed(list(params.items()))), 0)
    variants = [request_key("m2", MESSAGES, params, 0), request_key("m", MESSAGES, {**params, "seed": 2}, 0),
                request_key("m", MESSAGES, {**params, "top_k": 5}, 0), request_key("m", MESSAGES, params, 1),
                request_key("m", [{"role": "user", "content": "other"}], params, 0)]
    assert key not in variants and len(set(variants)) == len(variants)


def test_backoff_grows_is_capped_and_honours_retry_after():
    rng = random.Random(0)
    delays = [backoff_delay_s(n, 1.0, 8.0, None, rng) for n in range(6)]
    for n, delay in enumerate(delays):
        expo = min(8.0, 2.0 ** n)
        assert expo / 2 <= delay <= expo
    assert backoff_delay_s(0, 1.0, 8.0, 5.0, rng) == 5.0
    assert backoff_delay_s(0, 1.0, 8.0, 120.0, rng) == 8.0


def test_retry_after_headers_are_read():
    def failure(headers):  # the shape of an openai.APIStatusError: .response.headers
        return types.SimpleNamespace(response=types.SimpleNamespace(headers=headers))

    assert retry_after_s(failure({"retry-after-ms": "20", "retry-after": "1"})) == 0.02
    assert retry_after_s(failure({"retry-after": "3"})) == 3.0
    in_ten_s = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 < retry_after_s(failure({"retry-after": in_ten_s})) <= 10
    assert retry_after_s(failure({})) is None and retry_after_s(ValueError("no response")) is None


def test_teacher_config_errors_name_the_field():
    base = {"name": "t", "base_url": "http://h:8000/v1", "model": "m"}
    with pytest.raises(DataToolError, match=r"unknown field 'temprature'; did you mean 'temperature'"):
        TeacherConfig.from_dict({**base, "temprature": 0.5}, "recipe.teachers[0]")
    with pytest.raises(DataToolError, match=r"recipe.teachers\[0\].max_retries: expected int, got a string"):
        TeacherConfig.from_dict({**base, "max_retries": "3"}, "recipe.teachers[0]")
    with pytest.raises(DataToolError, match="must start with http"):
        TeacherConfig.from_dict({**base, "base_url": "localhost:8000"})
    with pytest.raises(DataToolError, match="weight must be > 0"):
        TeacherConfig.from_dict({**base, "weight": 0})
    assert undocumented_fields(TeacherConfig) == []
