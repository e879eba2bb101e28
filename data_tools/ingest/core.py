"""Seed ingestion: entries (see sources.py) -> seed documents, with a count of every file dropped and why.

A seed document is ``{"id", "text", "path", "source", "language", "licenses", "license"}``
(plus ``"commit"`` for git checkouts). Checks run cheapest first and a file is counted once,
under the first check it fails: its name (vendored, minified, unknown extension), reading
(symlink, not UTF-8, empty), language, quality filters, then licenses.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from data_tools._common import DataToolError
from data_tools.ingest.language import EXTENSIONS, detect_language
from data_tools.ingest.license import LicenseConfig, decide_license
from data_tools.ingest.quality import QualityConfig, path_rejection, quality_rejection
from data_tools.ingest.sources import SourceConfig
from data_tools.records import stable_id
from data_tools.seed_corpus import read_source_file

SCHEMA_LANGUAGES = ("python", "c", "cpp", "java", "javascript", "go", "rust", "bash")


@dataclass
class IngestConfig:
    """What to read and which files to keep."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Directories, git checkouts, files or jsonl corpora to read (at least one)."""
    languages: list[str] = field(default_factory=lambda: list(SCHEMA_LANGUAGES))
    """Languages to keep; files detected as another language are dropped and counted."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Size, line-length, alphanumeric and generated/vendored/minified filters."""
    license: LicenseConfig = field(default_factory=LicenseConfig)
    """Permissive-license whitelist and header scanning."""

    def check(self) -> None:
        if not self.sources:
            raise DataToolError("ingest needs at least one entry in sources (a directory, git checkout, file or .jsonl)")
        for source in self.sources:
            source.check()
        self.quality.check()
        self.license.check()


class _EntryReader:
    """Reads the text behind an entry; keeps jsonl files open across entries."""

    def __init__(self, config: IngestConfig):
        self.config, self.handles = config, {}
        self.stack = contextlib.ExitStack()

    def _jsonl_handle(self, path: str) -> IO[bytes]:
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(open(path, "rb"))
        return self.handles[path]

    def read(self, entry: dict) -> tuple[str | None, str | None, str]:
        """(text, path, "") or (None, path, reason)."""
        if entry["kind"] == "file":
            text, reason = read_source_file(entry["file"], self.config.quality.max_file_bytes or 1 << 62)
            return text, entry["path"], ("quality.max_file_bytes" if reason == "too_large" else f"read.{reason}")
        f = self._jsonl_handle(entry["file"])
        f.seek(entry["offset"])
        where = f"{entry['file']}:{entry['line']}"
        try:
            record = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataToolError(f"{where}: invalid JSON ({exc}); each line must be one JSON object") from None
        text = record.get(entry["text_field"])
        if not isinstance(text, str):
            raise DataToolError(f"{where}: field {entry['text_field']!r} must hold the document text "
                                f"(a string); set the source's text_field")
        entry["record_licenses"] = _record_licenses(record)
        path = record.get(entry["path_field"])
        return (text, path, "") if text.strip() else (None, path, "read.empty")


def _record_licenses(record: dict) -> list[str]:
    """License expressions a jsonl record declares for itself ("licenses" list or "license" string)."""
    if isinstance(record.get("licenses"), list) and record["licenses"]:
        return [" AND ".join(str(x) for x in record["licenses"])]
    return [record["license"]] if isinstance(record.get("license"), str) and record["license"] else []


def _early_rejection(entry: dict, config: IngestConfig) -> str | None:
    """Checks decided by the file name alone, before reading anything."""
    name = entry.get("path") if entry["kind"] == "file" else None
    rejected = path_rejection(name, config.quality)
    if rejected:
        return f"quality.{rejected}"
    extension = os.path.splitext(name or "")[1].lower()
    if extension and extension != ".h" and EXTENSIONS.get(extension) is None:
        return "language_unknown"
    return None


def ingest_entry(entry: dict, reader: _EntryReader, counts: collections.Counter) -> dict | None:
    """The seed document for one entry, or None after counting why it was dropped."""
    config = reader.config
    reason = _early_rejection(entry, config)
    text, path, language = None, entry.get("path"), None
    if reason is None:
        text, path, reason = reader.read(entry)
    if text is not None:
        language, reason = _content_rejection(path, text, config)
    if text is not None and not reason:
        declared = entry.get("declared", []) + entry.get("record_licenses", [])
        decision = decide_license(entry.get("directory_licenses", []), declared, text, config.license)
        counts.update(f"license_rejected.{spdx}" for spdx in decision.rejected)
        reason = decision.reason
    if reason:
        counts[f"dropped.{reason}"] += 1
        return None
    document = {"id": stable_id(entry["source"], path or "", text, prefix="seed-"), "text": text, "path": path,
                "source": entry["source"], "language": language,
                "licenses": decision.licenses, "license": " AND ".join(decision.licenses)}
    if entry.get("commit"):
        document["commit"] = entry["commit"]
    return document


def _content_rejection(path: str | None, text: str, config: IngestConfig) -> tuple[str | None, str]:
    """(detected language, "" or the reason the text is dropped)."""
    language = detect_language(path, text)
    if language is None:
        return None, "language_unknown"
    if language not in config.languages:
        return language, f"language_not_selected.{language}"
    rejected = quality_rejection(path, text, config.quality)
    return language, f"quality.{rejected}" if rejected else ""


def ingest_entries(config: IngestConfig, entries: Iterable[dict], counts: collections.Counter) -> Iterator[dict]:
    """Seed documents for ``entries``; ``counts`` gains ``dropped.<reason>`` for every file left out."""
    reader = _EntryReader(config)
    with reader.stack:
        for entry in entries:
            document = ingest_entry(entry, reader, counts)
            if document is not None:
                yield document


def plan_ingest(config: IngestConfig) -> list[dict]:
    """Every candidate file of every source, as entries (the ingest stage's shard inputs)."""
    from data_tools.ingest.sources import list_entries

    return [entry for source in config.sources for entry in list_entries(source)]
