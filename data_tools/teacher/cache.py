"""SQLite cache of teacher replies, keyed by a hash of the full request.

A rerun (after a crash, or with more strategies added) asks the same questions again; every
one already answered is served from this file at no cost. The key covers everything that
changes the answer: model, messages, sampling parameters, the per-request seed and the attempt
number (so that a reply the parser rejected is replayed as rejected, and the retry after it is
replayed too, keeping reruns identical). The server's URL is deliberately not in the key: the
same model moved to another host gives the same answers.

Why SQLite: one file, transactional (a ``kill -9`` loses at most the reply being written, never
earlier ones), and WAL mode lets several generation processes share a cache (readers never
block; writers wait on ``busy_timeout``). Within a process one connection is shared behind a
lock, so concurrent coroutines and worker threads can all write.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading

SCHEMA = "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)"


def request_key(model: str, messages: list[dict], params: dict, attempt: int) -> str:
    """Hex SHA-256 of the canonical JSON of a request (key order and whitespace do not matter)."""
    material = {"model": model, "messages": messages, "params": params, "attempt": attempt}
    canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Persistent ``key -> reply dict`` map in one SQLite file (created if missing)."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=60.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL loses nothing on a process crash (only on power loss), and avoids an
        # fsync per reply.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, reply: dict) -> None:
        """Store ``reply`` unless ``key`` is present (the first answer wins, so reruns replay it)."""
        raw = json.dumps(reply, ensure_ascii=False)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO replies (key, reply) VALUES (?, ?)", (key, raw))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
