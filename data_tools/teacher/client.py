"""Async client for one teacher: bounded concurrency, our own retry policy, SQLite cache, parsing.

Built on ``openai.AsyncOpenAI`` (any OpenAI-compatible server: vLLM, SGLang, TGI, hosted APIs)
with the package's own retries switched off (``max_retries=0``), so that the policy in
:mod:`data_tools.teacher.backoff` is the only one and its counts are the real ones.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import openai

from data_tools.teacher.backoff import MalformedReply, backoff_delay_s, is_retryable, retry_after_s
from data_tools.teacher.cache import ResponseCache, request_key
from data_tools.teacher.config import TeacherConfig
from data_tools.teacher.errors import ReplyRejected, TeacherError

T = TypeVar("T")
# Fields the openai client takes as keyword arguments; everything else travels in extra_body.
NAMED_PARAMS = ("temperature", "top_p", "max_tokens")
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass
class TeacherAnswer(Generic[T]):
    """A reply the parser accepted."""

    value: T
    """What the parser returned."""
    text: str
    """The reply's raw text."""
    meta: dict
    """``teacher_meta`` of the sample: model, system_fingerprint, usage, cached."""


class TeacherClient:
    """Ask one teacher questions; see :meth:`ask`."""

    def __init__(self, config: TeacherConfig, cache: ResponseCache | None = None):
        self.config = config
        self.cache = cache
        self.stats: collections.Counter = collections.Counter()
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._jitter = random.Random()  # jitter must differ between processes, so it is not seeded
        self._client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key(),
                                          max_retries=0, timeout=config.timeout_s)

    async def ask(self, messages: list[dict], parse: Callable[[str], T], key: str) -> TeacherAnswer[T]:
        """Return the first reply ``parse`` accepts; raise :class:`ReplyRejected` if none is.

        ``key`` names the work item (e.g. its sample id): it seeds the request, so the same item
        asks the same question on every run, and different items sample differently.
        Transport failures are retried inside each attempt; a :class:`TeacherError` means the
        server kept failing for ``max_retries`` retries or refused the request outright.
        """
        last: ReplyRejected | None = None
        for attempt in range(1 + self.config.max_rejected_replies):
            reply, cached = await self._reply(messages, key, attempt)
            try:
                value = parse(reply["text"])
            except ReplyRejected as exc:
                self.stats["rejected_replies"] += 1
                last = exc
                continue
            meta = {"model": reply["model"], "system_fingerprint": reply["system_fingerprint"],
                    "usage": reply["usage"], "cached": cached}
            return TeacherAnswer(value=value, text=reply["text"], meta=meta)
        assert last is not None
        raise ReplyRejected(f"{1 + self.config.max_rejected_replies} replies rejected, last because: {last.reason}")

    def request_seed(self, key: str, attempt: int) -> int | None:
        """Per-request sampling seed derived from the base seed, the work item and the attempt."""
        if self.config.seed is None:
            return None
        digest = hashlib.sha256(f"{self.config.seed}/{key}/{attempt}".encode()).digest()
        return int.from_bytes(digest[:4], "big") >> 1  # 31 bits: some servers reject larger seeds

    async def _reply(self, messages: list[dict], key: str, attempt: int) -> tuple[dict, bool]:
        params = self.config.sampling_params()
        seed = self.request_seed(key, attempt)
        if seed is not None:
            params["seed"] = seed
        cache_key = request_key(self.config.model, messages, params, attempt)
        if self.cache is not None:
            hit = self.cache.get(cache_key)
            if hit is not None:
                self.stats["cache_hits"] += 1
                return hit, True
        reply = await self._request_with_retries(messages, params)
        if self.cache is not None:
            self.cache.put(cache_key, reply)
        return reply, False

    async def _request_with_retries(self, messages: list[dict], params: dict) -> dict:
        cfg = self.config
        last: BaseException | None = None
        for retry in range(cfg.max_retries + 1):
            try:
                async with self._semaphore:
                    self.stats["requests"] += 1
                    return await self._request_once(messages, params)
            except Exception as exc:  # noqa: BLE001 - sorted into retryable / fatal right here
                if not is_retryable(exc):
                    raise TeacherError(f"teacher {cfg.name!r}: {cfg.base_url} refused the request: "
                                       f"{describe_failure(exc)}; fix the teacher's settings") from exc
                last = exc
            if retry < cfg.max_retries:
                self.stats["retries"] += 1
                delay = backoff_delay_s(retry, cfg.backoff_base_s, cfg.backoff_max_s, retry_after_s(last), self._jitter)
                await asyncio.sleep(delay)
        raise TeacherError(f"teacher {cfg.name!r}: gave up after {cfg.max_retries + 1} attempts at {cfg.base_url}; "
                           f"last error: {describe_failure(last)}. Outputs written so far are kept: rerun to resume")

    async def _request_once(self, messages: list[dict], params: dict) -> dict:
        named = {k: params[k] for k in NAMED_PARAMS if k in params}
        extra = {k: v for k, v in params.items() if k not in NAMED_PARAMS and k != "seed"}
        completion = await self._client.chat.completions.create(
            model=self.config.model, messages=messages, seed=params.get("seed", openai.NOT_GIVEN),
            extra_body=extra or None, **named)
        choices = getattr(completion, "choices", None)
        if not choices:
            raise MalformedReply("the reply has no choices")
        text = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(text, str) or not text.strip():
            raise MalformedReply("the reply's message content is empty")
        usage = getattr(completion, "usage", None)
        return {
            "text": text,
            "model": getattr(completion, "model", None) or self.config.model,
            "system_fingerprint": getattr(completion, "system_fingerprint", None),
            "usage": {name: getattr(usage, name, None) for name in USAGE_FIELDS},
            "finish_reason": getattr(choices[0], "finish_reason", None),
        }

    async def aclose(self) -> None:
        await self._client.close()


def describe_failure(exc: BaseException | None) -> str:
    """One line naming the failure the way an operator thinks of it."""
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out (raise timeout_s if replies are legitimately long)"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot connect ({exc.__cause__ or exc})"
    if isinstance(exc, ValueError) and not isinstance(exc, ReplyRejected):
        return f"reply body is not valid JSON ({exc})"
    return f"{type(exc).__name__}: {exc}"
