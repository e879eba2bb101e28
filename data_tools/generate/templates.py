"""Prompt templates: Markdown files in ``data_tools/generate/prompts/`` with ``$name`` placeholders.

Templates are files, not Python strings, so that prompt engineers can edit and diff them
without touching code. ``string.Template`` is used rather than ``str.format`` because prompts
are full of code with braces; a literal dollar sign is written ``$$``. Substitution is strict:
a placeholder without a value is a bug and raises at once.
"""
from __future__ import annotations

import functools
import os
import string

from data_tools.generate.reply_sections import split_sections

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
LANGUAGES = ("python", "c", "cpp", "java", "javascript", "go", "rust", "bash")


@functools.lru_cache(maxsize=None)
def template_text(name: str) -> str:
    with open(os.path.join(PROMPTS_DIR, f"{name}.md"), encoding="utf-8") as f:
        return f.read()


def render(name: str, **values: str) -> str:
    """The template ``prompts/<name>.md`` with every ``$placeholder`` filled."""
    return string.Template(template_text(name)).substitute(values).strip() + "\n"


def chat_messages(name: str, **values: str) -> list[dict]:
    """System prompt plus the rendered template, as OpenAI chat messages."""
    return [{"role": "system", "content": template_text("system").strip()},
            {"role": "user", "content": render(name, **values)}]


@functools.lru_cache(maxsize=None)
def named_sections(name: str) -> dict[str, str]:
    """The ``## id`` sections of ``prompts/<name>.md`` (mutations, test conventions)."""
    text = template_text(name)
    ids = tuple(line[3:].strip() for line in text.splitlines() if line.startswith("## "))
    return split_sections(text, ids)


def evol_mutations() -> dict[str, str]:
    """Mutation id -> instruction, in file order."""
    return named_sections("evol_mutations")


def conventions_for_tests(language: str) -> str:
    return named_sections("test_conventions")[language]

