"""Check a teacher before any work: key present, server reachable, model served.

One ``GET /v1/models`` per teacher (cheap on every OpenAI-compatible server) turns the three
most common setup mistakes into one clear sentence each, instead of a run that retries for
minutes and then fails on its first request.
"""
from __future__ import annotations

import json

import openai

from data_tools.teacher.config import TeacherConfig
from data_tools.teacher.errors import TeacherError

PROBE_TIMEOUT_S = 30.0


async def check_teacher(config: TeacherConfig) -> list[str]:
    """Raise :class:`TeacherError` naming the problem; return the served model ids (may be empty).

    A server without ``/v1/models`` (HTTP 404) is accepted: the model name is then checked by
    the first real request.
    """
    where = f"teacher {config.name!r}"
    client = openai.AsyncOpenAI(base_url=config.base_url, api_key=config.api_key(), max_retries=0,
                                timeout=min(config.timeout_s, PROBE_TIMEOUT_S))
    try:
        page = await client.models.list()
    except openai.NotFoundError:
        return []
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        env = config.api_key_env or "api_key_env (unset: no key was sent)"
        raise TeacherError(f"{where}: {config.base_url} rejected the API key (HTTP {exc.status_code}); "
                           f"check {env}") from None
    except openai.APIConnectionError as exc:
        raise TeacherError(f"{where}: cannot reach base_url {config.base_url} ({exc.__cause__ or exc}); is the "
                           "server running and the URL right (it must end in /v1, e.g. http://host:8000/v1)?") from None
    except openai.APIStatusError as exc:
        raise TeacherError(f"{where}: GET {config.base_url}/models answered HTTP {exc.status_code}; "
                           "expected an OpenAI-compatible server") from None
    except json.JSONDecodeError:
        raise TeacherError(f"{where}: {config.base_url}/models did not answer JSON; is base_url an "
                           "OpenAI-compatible endpoint (ending in /v1)?") from None
    finally:
        await client.close()
    served = [model.id for model in getattr(page, "data", None) or []]
    if served and config.model not in served:
        raise TeacherError(f"{where}: model {config.model!r} is not served at {config.base_url}; it serves "
                           f"{', '.join(served[:10])}. Set model to one of these")
    return served
