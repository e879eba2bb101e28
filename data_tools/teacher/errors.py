"""Errors of the teacher client."""
from __future__ import annotations

from data_tools._common import DataToolError


class TeacherError(DataToolError):
    """The teacher cannot be used: bad configuration, unreachable server, or retries exhausted.

    A subclass of :class:`DataToolError` so that the CLIs print it as one line: the message
    names the teacher, what went wrong and what to do about it.
    """


class ReplyRejected(ValueError):
    """A strategy's parser refused a teacher reply; ``reason`` says why in one sentence.

    The client counts a rejected reply as malformed and asks again (a bounded number of
    times); when every attempt is rejected the last reason reaches the generation runner,
    which records the work item as rejected instead of losing it.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
