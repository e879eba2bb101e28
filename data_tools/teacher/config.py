"""Configuration of one teacher: an OpenAI-compatible chat-completions endpoint and how to sample it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from data_tools.pipeline.config_loader import from_dict
from data_tools.teacher.errors import TeacherError

# Local servers (vLLM, SGLang, TGI) started without --api-key accept any key, but the openai
# client insists on a non-empty one.
NO_KEY_PLACEHOLDER = "EMPTY"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class TeacherConfig:
    """One teacher model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    name: str
    """Short name recorded in every sample's ``teacher`` field and used in sample ids (letters, digits, ``_.-``)."""
    base_url: str
    """Endpoint root including ``/v1``, e.g. ``http://gpu-node:8000/v1`` for ``vllm serve ... --port 8000``."""
    model: str
    """Model name as the server lists it under ``GET /v1/models`` (vLLM: the path or ``--served-model-name``)."""
    api_key_env: str | None = None
    """Environment variable holding the API key; ``None`` for servers started without a key (vLLM's default)."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_tokens: int = 2048
    """Upper bound on generated tokens per reply."""
    seed: int | None = 0
    """Base sampling seed; each request sends a seed derived from it and the work item, so reruns ask the same
    question and repeated items differ. ``None`` sends no seed (for servers that reject the field)."""
    extra_params: dict[str, object] = field(default_factory=dict)
    """Further sampling fields sent verbatim in the request body (vLLM/SGLang: ``top_k``, ``min_p``,
    ``repetition_penalty``); they are part of the cache key."""
    weight: float = 1.0
    """Relative share of work items given to this teacher when a run has several."""
    max_concurrency: int = 8
    """Requests in flight to this teacher at once."""
    timeout_s: float = 600.0
    """Seconds one request may take before it is abandoned and retried."""
    max_retries: int = 6
    """Retries of one request after 429, 5xx, timeouts, connection errors and malformed bodies."""
    max_rejected_replies: int = 2
    """Extra attempts when a well-formed reply is refused by the strategy's parser (then the item is recorded as
    rejected)."""
    backoff_base_s: float = 1.0
    """First retry delay; doubles per retry, with jitter, unless the server's ``retry-after`` says otherwise."""
    backoff_max_s: float = 60.0
    """Longest single wait between retries (also caps ``retry-after``)."""

    def __post_init__(self) -> None:
        where = f"teacher {self.name!r}"
        if not NAME_PATTERN.match(self.name):
            raise TeacherError(f"teacher name {self.name!r} must be letters, digits, '_', '.' or '-' "
                               "(it goes into sample ids and file names)")
        if not self.base_url.startswith(("http://", "https://")):
            raise TeacherError(f"{where}: base_url {self.base_url!r} must start with http:// or https://, "
                               "e.g. http://localhost:8000/v1")
        positive = {"weight": self.weight, "max_concurrency": self.max_concurrency, "timeout_s": self.timeout_s,
                    "max_tokens": self.max_tokens}
        non_negative = {"max_retries": self.max_retries, "max_rejected_replies": self.max_rejected_replies,
                        "backoff_base_s": self.backoff_base_s, "backoff_max_s": self.backoff_max_s,
                        "temperature": self.temperature}
        for key, value in positive.items():
            if value <= 0:
                raise TeacherError(f"{where}: {key} must be > 0, got {value}")
        for key, value in non_negative.items():
            if value < 0:
                raise TeacherError(f"{where}: {key} must be >= 0, got {value}")
        if not 0 < self.top_p <= 1:
            raise TeacherError(f"{where}: top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "teacher") -> "TeacherConfig":
        """Build from a recipe mapping; unknown or mistyped fields are errors naming ``where``."""
        return from_dict(cls, values, where)

    def api_key(self) -> str:
        """The key to send, read from ``api_key_env``; a clear error when that variable is unset."""
        if self.api_key_env is None:
            return NO_KEY_PLACEHOLDER
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise TeacherError(f"teacher {self.name!r}: environment variable {self.api_key_env} is not set; "
                               f"export {self.api_key_env}=<key>, or set api_key_env: null for a server "
                               "started without --api-key")
        return key

    def sampling_params(self) -> dict:
        """Request fields other than model/messages/seed; all of them are part of the cache key."""
        params = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        params.update(self.extra_params)
        return params
