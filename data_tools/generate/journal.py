"""Append-only, crash-safe output of a generation run: accepted and rejected records by id.

The design (docs/synthesis.md, "Crash safety"):

- Every record has a deterministic id (see :mod:`data_tools.generate.work`), known before the
  teacher is asked.
- A record is appended as one line with a single ``write`` and made durable with ``fsync``
  before the run moves on, so a record either is in the file whole, or (killed mid-write) is
  a torn last line without its newline.
- Opening a journal reads both files, drops a torn last line (truncating the file, so the next
  append starts on a clean line) and indexes the ids it holds. A rerun skips every indexed id,
  so nothing is written twice, and redoes every other item, so nothing is lost; the reply
  cache makes the redone requests free.
- One run at a time per directory: an exclusive ``flock`` on ``.lock`` (released by the kernel
  even on ``kill -9``) stops two processes from interleaving appends.
"""
from __future__ import annotations

import fcntl
import json
import os

from data_tools._common import DataToolError

ACCEPTED, REJECTED = "accepted", "rejected"
FILE_NAMES = {ACCEPTED: "samples.jsonl", REJECTED: "rejected.jsonl"}


class SampleJournal:
    """``samples.jsonl`` (accepted) and ``rejected.jsonl`` in one directory, indexed by id."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.paths = {kind: os.path.join(directory, name) for kind, name in FILE_NAMES.items()}
        self._lock_fd = _lock_directory(directory)
        self.index: dict[str, tuple[str, int]] = {}  # id -> (kind, byte offset of its line)
        self.dropped_torn_lines = 0
        self._fds: dict[str, int] = {}
        for kind, path in self.paths.items():
            self._recover(kind, path)
            self._fds[kind] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def _recover(self, kind: str, path: str) -> None:
        if not os.path.exists(path):
            return
        offset = 0
        with open(path, "r+b") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):  # torn by a crash mid-write: the record never counted
                    f.truncate(offset)
                    os.fsync(f.fileno())
                    self.dropped_torn_lines += 1
                    break
                record_id = _record_id(line, path, lineno)
                self.index.setdefault(record_id, (kind, offset))
                offset += len(line)

    def status(self, record_id: str) -> str | None:
        """``"accepted"``, ``"rejected"`` or None (not written yet)."""
        entry = self.index.get(record_id)
        return entry[0] if entry else None

    def get(self, record_id: str) -> dict | None:
        """The record written under ``record_id``, read back from its file."""
        entry = self.index.get(record_id)
        if entry is None:
            return None
        kind, offset = entry
        with open(self.paths[kind], "rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def append(self, kind: str, record: dict) -> None:
        """Durably append ``record``; a second record with the same id is refused (a bug upstream)."""
        if record["id"] in self.index:
            raise RuntimeError(f"record {record['id']} is already in {self.paths[self.index[record['id']][0]]}")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._fds[kind]
        offset = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(line)
        while view:  # os.write may write less than asked (signals, huge records)
            view = view[os.write(fd, view):]
        os.fsync(fd)
        self.index[record["id"]] = (kind, offset)

    def records(self, kind: str):
        """Iterate the records of one file in write order."""
        with open(self.paths[kind], "rb") as f:
            for line in f:
                yield json.loads(line)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        os.close(self._lock_fd)

    def __enter__(self) -> "SampleJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record_id(line: bytes, path: str, lineno: int) -> str:
    try:
        record = json.loads(line)
        return record["id"]
    except (ValueError, KeyError, TypeError):
        raise DataToolError(f"{path}:{lineno}: not a generation record (a complete line that is not JSON with an "
                            "'id'); the file was edited or corrupted: move it away to start afresh") from None


def _lock_directory(directory: str) -> int:
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataToolError(f"another generation run is writing to {directory!r}; wait for it to finish or choose "
                            "another output_dir") from None
    return fd
