"""Which request failures are worth retrying, and how long to wait before the next try."""
from __future__ import annotations

import email.utils
import json
import random
import time

import openai

# Statuses that say "try again later"; 4xx other than these mean the request itself is wrong
# (bad model name, bad key, bad parameter) and retrying would only repeat the error.
RETRYABLE_STATUS = frozenset({408, 409, 429})


class MalformedReply(Exception):
    """The server answered 2xx but the body is unusable (not JSON, no choices, no content)."""


def is_retryable(exc: BaseException) -> bool:
    """True for 429/408/409/5xx, timeouts, connection errors and malformed bodies."""
    if isinstance(exc, (MalformedReply, json.JSONDecodeError, openai.APIConnectionError)):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, openai.APIResponseValidationError)


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``retry-after``), if it said."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    date = headers.get("retry-after")
    try:
        return max(0.0, email.utils.parsedate_to_datetime(date).timestamp() - time.time()) if date else None
    except (TypeError, ValueError):
        return None


def backoff_delay_s(retry: int, base_s: float, max_s: float, server_hint_s: float | None,
                    rng: random.Random) -> float:
    """Delay before retry number ``retry`` (0-based).

    Exponential (``base * 2**retry``) with "equal jitter" (half fixed, half random) so that many
    workers hit by the same 429 do not come back in lockstep; a server's ``retry-after`` wins
    when it asks for longer. Both are capped at ``max_s``.
    """
    exponential = min(max_s, base_s * (2 ** retry))
    delay = exponential / 2 + rng.uniform(0, exponential / 2)
    if server_hint_s is not None:
        delay = max(delay, server_hint_s)
    return min(delay, max_s)
