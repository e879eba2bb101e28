"""What every stage needs to know about a record: its text, its pretraining rendering, its id.

Two kinds of records flow through the pipeline (see docs/data_tools.md, "Record schema"):

- seed documents from ingestion: ``{"id", "text", "path", "source", "language", "licenses", "license"}``;
- generated samples: ``{"id", "strategy", "problem", "solution", "tests", ...}``, or textbook
  samples (strategy ``"textbook"``) that carry ``"text"`` instead of problem/solution/tests.

Dedup, decontamination, the coverage report and the exporters all look at the same text of a
record, so it is defined once here.
"""
from __future__ import annotations

import hashlib
import json
from typing import IO, Any, Iterable

from data_tools._common import atomic_outputs

# Markdown fence languages for the languages the toolkit generates; others use their own name.
FENCE_LANGUAGE = {"cpp": "cpp", "c": "c", "bash": "bash", "javascript": "javascript"}


def stable_id(*parts: str, prefix: str = "") -> str:
    """A short deterministic id: the first 16 hex digits of sha256 over the NUL-joined parts."""
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}{digest}"


def is_sample(record: dict) -> bool:
    """True for a generated problem/solution sample, False for a seed or textbook document."""
    return "text" not in record and ("problem" in record or "solution" in record)


def record_text(record: dict) -> str:
    """The text that dedup and decontamination compare: the document, or problem + solution + tests."""
    if "text" in record:
        return record["text"] or ""
    parts = (record.get("problem") or "", record.get("solution") or "", record.get("tests") or "")
    return "\n\n".join(part for part in parts if part)


def fenced(code: str, language: str | None) -> str:
    """A markdown code block; the fence tag lets a model learn which language follows."""
    tag = FENCE_LANGUAGE.get(language or "", language or "")
    return f"```{tag}\n{code.rstrip()}\n```"


def format_io_examples(examples: list) -> str:
    blocks = []
    for example in examples or []:
        blocks.append(f"Input:\n{fenced(str(example.get('input', '')), None)}\n"
                      f"Output:\n{fenced(str(example.get('output', '')), None)}")
    return "\n\n".join(blocks)


def pretraining_document(record: dict) -> str:
    """A record as one pretraining document.

    Seed and textbook documents are used as they are. A sample becomes the problem statement,
    then the solution and its tests (or stdin/stdout examples) as fenced code blocks, so the
    model sees a problem, its answer and the evidence that the answer works, in that order.
    """
    if not is_sample(record):
        return record.get("text") or ""
    language = record.get("language")
    parts = [(record.get("problem") or "").strip(), "Solution:\n" + fenced(record.get("solution") or "", language)]
    if record.get("tests"):
        parts.append("Tests:\n" + fenced(record["tests"], language))
    elif record.get("io_examples"):
        parts.append("Examples:\n" + format_io_examples(record["io_examples"]))
    return "\n\n".join(part for part in parts if part) + "\n"


def execution_verdict(record: dict) -> str | None:
    """The sandbox verdict of a validated sample, or None when it was never executed."""
    execution = record.get("execution")
    return execution.get("verdict") if isinstance(execution, dict) else None


class HashingJsonlWriter:
    """Writes one JSON object per line to an open binary file and hashes what it writes.

    The sha256 lets done markers and manifests record an output's digest without reading the
    (possibly large) file back.
    """

    def __init__(self, f: IO[bytes]):
        self.f, self.sha256, self.count, self.bytes = f, hashlib.sha256(), 0, 0

    def write(self, record: dict) -> None:
        # ensure_ascii=False keeps non-ASCII code readable and smaller than \\u escapes.
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.f.write(line)
        self.sha256.update(line)
        self.count += 1
        self.bytes += len(line)


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_records_atomic(path: str, records: Iterable[dict]) -> dict:
    """Write ``records`` as jsonl via temp + rename; return ``{"sha256", "bytes", "records"}``."""
    with atomic_outputs([path]) as (tmp,), open(tmp, "wb") as f:
        writer = HashingJsonlWriter(f)
        for record in records:
            writer.write(record)
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.bytes, "records": writer.count}


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON via temp + rename."""
    with atomic_outputs([path]) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
