"""Where seed files come from: directories, single files, git checkouts and jsonl corpora.

Listing a source yields *entries*, small JSON objects that say where one document is and
which licenses cover it from outside (its directory's LICENSE files, the source's declared
license, the checkout's commit). Ingestion shards are lists of entries, so the expensive
part (reading and filtering the files) runs in parallel shards while listing stays cheap.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

from data_tools._common import DataToolError
from data_tools.ingest.license import LICENSE_FILE_PATTERN, license_file_ids

SOURCE_KINDS = ("auto", "dir", "file", "git", "jsonl")


@dataclass
class SourceConfig:
    """One place to read seed code from."""

    path: str = field(default="", metadata={"path": "exists"})
    """A directory, a git checkout (its working tree is read), a single file, or a .jsonl file."""
    kind: str = "auto"
    """One of auto, dir, file, git, jsonl; auto picks git for a directory holding .git, jsonl for *.jsonl."""
    name: str | None = None
    """The documents' "source" field; default: the directory or file name."""
    license: str | None = None
    """SPDX expression that covers the whole source, added to what is detected (needed for
    trees without LICENSE files, and for jsonl records without license fields)."""
    text_field: str = "text"
    """jsonl only: the field holding the document text."""
    path_field: str = "path"
    """jsonl only: the field holding the document's file name (used for language detection; may be absent)."""

    def check(self) -> None:
        if not self.path:
            raise DataToolError("source needs a path (a directory, git checkout, file or .jsonl)")
        if self.kind not in SOURCE_KINDS:
            raise DataToolError(f"source kind {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")

    def resolved_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        if os.path.isdir(self.path):
            return "git" if os.path.exists(os.path.join(self.path, ".git")) else "dir"
        return "jsonl" if self.path.endswith(".jsonl") else "file"

    def source_name(self) -> str:
        base = os.path.basename(os.path.normpath(os.path.abspath(self.path)))
        return self.name or (base[:-len(".jsonl")] if base.endswith(".jsonl") else base)


class DirectoryLicenses:
    """Licenses granted by LICENSE/COPYING/NOTICE files, per directory of one tree.

    A file is covered by the license files of the nearest directory above it (itself
    included) that has any: a vendored subtree with its own LICENSE overrides the root's.
    """

    def __init__(self, root: str):
        self.root, self._own, self._nearest = root, {}, {}

    def _own_ids(self, rel_dir: str) -> list[str]:
        if rel_dir not in self._own:
            directory = os.path.join(self.root, rel_dir)
            ids: set[str] = set()
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if LICENSE_FILE_PATTERN.match(name) and os.path.isfile(path) and not os.path.islink(path):
                    with open(path, encoding="utf-8", errors="replace") as f:
                        ids |= license_file_ids(f.read(200_000))
            self._own[rel_dir] = sorted(ids)
        return self._own[rel_dir]

    def for_file(self, rel_path: str) -> list[str]:
        rel_dir = os.path.dirname(rel_path)
        if rel_dir not in self._nearest:
            own = self._own_ids(rel_dir)
            self._nearest[rel_dir] = own if own or not rel_dir else self.for_file(rel_dir)
        return self._nearest[rel_dir]


def walk_tree(root: str) -> list[str]:
    """Sorted relative paths of the regular files and symlinks under ``root``; hidden directories skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        found.extend(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/") for name in filenames)
    return sorted(found)


def git_checkout(root: str) -> tuple[str | None, list[str]]:
    """(HEAD commit, files of the working tree that git does not ignore) of a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], check=True, capture_output=True, text=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    except FileNotFoundError:
        raise DataToolError(f"source {root!r} is a git checkout but the git command is not installed; "
                            "install git or set kind: dir") from None
    except subprocess.CalledProcessError as exc:
        raise DataToolError(f"source {root!r}: git failed ({exc.stderr.strip()[:200]}); "
                            "check the checkout or set kind: dir to read it as a plain directory") from None
    files = sorted(p for p in listed if p and os.path.isfile(os.path.join(root, p)))
    return commit, files


def _tree_entries(source: SourceConfig, root: str, rel_paths: list[str], commit: str | None) -> Iterator[dict]:
    licenses = DirectoryLicenses(root)
    declared = [source.license] if source.license else []
    for rel in rel_paths:
        full = os.path.join(root, rel)
        st = os.lstat(full)
        yield {"kind": "file", "file": full, "path": rel, "source": source.source_name(), "commit": commit,
               "directory_licenses": licenses.for_file(rel), "declared": declared,
               "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonl_entries(source: SourceConfig) -> Iterator[dict]:
    declared = [source.license] if source.license else []
    path = os.path.abspath(source.path)
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield {"kind": "jsonl", "file": path, "offset": offset, "line": lineno,
                       "source": source.source_name(), "declared": declared, "bytes": len(raw),
                       "text_field": source.text_field, "path_field": source.path_field}
            offset += len(raw)


def list_entries(source: SourceConfig) -> Iterator[dict]:
    """Every candidate document of ``source`` as an entry (see module doc), in a fixed order."""
    kind = source.resolved_kind()
    if kind == "jsonl":
        yield from _jsonl_entries(source)
        return
    if kind == "file":
        root = os.path.dirname(os.path.abspath(source.path))
        yield from _tree_entries(source, root, [os.path.basename(source.path)], None)
        return
    root = os.path.abspath(source.path)
    if not os.path.isdir(root):
        raise DataToolError(f"source {source.path!r} has kind {kind} but is not a directory")
    commit, files = git_checkout(root) if kind == "git" else (None, walk_tree(root))
    yield from _tree_entries(source, root, files, commit)
