"""Seed documents for the seeded strategies, and the snippet of each that a teacher is shown."""
from __future__ import annotations

import random

from data_tools._common import DataToolError, require_file
from data_tools.generate.sources import read_records
from data_tools.records import stable_id

SNIPPET_MAX_CHARS = 4000  # keeps one prompt well inside a teacher's context however long the lines are


def load_seeds(path: str) -> list[dict]:
    """Read a seed-document jsonl; every line must be an object with a non-empty ``text``.

    Documents without an ``id`` get one from their text, so older seed files (which had none)
    still give stable sample ids.
    """
    require_file(path, "seeds_path", "pass the jsonl written by seed_corpus or ingestion")
    seeds = read_records(path, lambda doc: isinstance(doc.get("text"), str) and doc["text"].strip(),
                         "a seed document needs a non-empty string field 'text'")
    for doc in seeds:
        doc.setdefault("id", stable_id(doc["text"], prefix="seed-"))
    if not seeds:
        raise DataToolError(f"seeds_path {path!r} holds no seed documents")
    return seeds


def snippet(seed: dict, max_lines: int, rng: random.Random) -> str:
    """A window of at most ``max_lines`` consecutive lines of the seed, placed by ``rng``.

    Showing a window rather than the file's head (after Magicoder's OSS-Instruct) gives the
    teacher varied material: a file's first lines are mostly license headers and imports, and
    repeated items of the same seed see different parts of it.
    """
    lines = seed["text"].splitlines()
    start = rng.randrange(0, max(1, len(lines) - max_lines + 1))
    window = "\n".join(lines[start:start + max_lines]).strip("\n")
    if not window.strip():  # a window of blank lines: fall back to the document's start
        window = seed["text"].strip("\n")
    return window[:SNIPPET_MAX_CHARS] + "\n"
