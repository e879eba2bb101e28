"""Teacher LLM client: any OpenAI-compatible chat-completions server (vLLM, SGLang, TGI, hosted APIs).

- :class:`TeacherConfig` — endpoint, model, sampling, weight, concurrency, timeout, retries.
- :class:`TeacherClient` — async ``ask(messages, parse, key)`` with bounded concurrency, retries
  with exponential backoff and jitter, parser-rejected replies re-asked a bounded number of
  times, and every reply recorded in a :class:`ResponseCache` (SQLite) so reruns are free.
- :func:`check_teacher` — preflight: API-key variable, reachability, model name.

See docs/synthesis.md.
"""
from data_tools.teacher.cache import ResponseCache, request_key
from data_tools.teacher.client import TeacherAnswer, TeacherClient
from data_tools.teacher.config import TeacherConfig
from data_tools.teacher.errors import ReplyRejected, TeacherError
from data_tools.teacher.preflight import check_teacher

__all__ = ["ResponseCache", "request_key", "TeacherAnswer", "TeacherClient", "TeacherConfig", "ReplyRejected",
           "TeacherError", "check_teacher"]
