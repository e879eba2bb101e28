"""Textbook-style explanatory documents (after phi-1's "textbook quality" data) for the pretraining mix."""
from __future__ import annotations

from data_tools.generate.reply_sections import fenced_blocks, unwrap_reply
from data_tools.generate.strategies.base import SeededStrategy
from data_tools.generate.work import WorkItem
from data_tools.teacher.errors import ReplyRejected

MIN_CHARS = 300


def parse_textbook_reply(text: str) -> dict:
    """``{"text": document}``: at least ``MIN_CHARS`` long, with at least one complete code example."""
    document = unwrap_reply(text).strip()
    if len(document) < MIN_CHARS:
        raise ReplyRejected(f"document is too short ({len(document)} characters, need {MIN_CHARS})")
    if fenced_blocks(document) == 0:
        raise ReplyRejected("document has no fenced code example")
    return {"text": document + "\n"}


class Textbook(SeededStrategy):
    name = "textbook"
    template = "textbook"
    validates = False  # prose with examples, not a program with tests

    def parse(self, text: str, item: WorkItem) -> dict:
        return parse_textbook_reply(text)
