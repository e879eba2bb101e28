"""The caller's side of jail.py's fork server: start servers, send them runs, keep a pool of idle ones.

A server costs one interpreter start-up (~30 ms) and then a fork per run, so concurrent workers each
borrow one from a process-wide pool and return it; idle servers exit when the pool is closed (at
interpreter exit) or when their request pipe closes.
"""
from __future__ import annotations

import atexit
import contextlib
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import Iterator

JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
# The server's own environment; each program gets the environment of its spec instead.
SERVER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class ServerDied(Exception):
    """The fork server exited or broke the protocol (a sandbox failure, never the program's)."""


class ForkServer:
    """One ``jail.py --serve`` process, used by one thread at a time."""

    def __init__(self) -> None:
        # -I: the same sys.path and flags as the ``python -I`` a Python program would otherwise run under.
        # Unbuffered pipes: select() must not miss a reply that a buffered reader already swallowed.
        self.proc = subprocess.Popen([sys.executable, "-I", JAIL, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, env=SERVER_ENV, cwd="/",
                                     start_new_session=True)

    def run(self, spec: dict, backstop_s: float) -> bool:
        """Run one spec; True if it ended by itself, False if it was killed after ``backstop_s`` seconds."""
        data = marshal.dumps(spec)
        packet = memoryview(struct.pack("<I", len(data)) + data)
        try:
            while packet:
                packet = packet[self.proc.stdin.write(packet):]
        except (BrokenPipeError, ValueError) as exc:
            raise ServerDied(f"the sandbox server is gone: {exc}") from None
        request_pid = self._reply()["pid"]
        ready, _, _ = select.select([self.proc.stdout], [], [], backstop_s)
        if not ready:  # the run's own supervisor did not end it in time: kill the request's whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(request_pid, signal.SIGKILL)
        self._reply()
        return bool(ready)

    def _reply(self) -> dict:
        (size,) = struct.unpack("<I", self._read_exactly(4))
        return marshal.loads(self._read_exactly(size))

    def _read_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.proc.stdout.read(size - len(data))
            if not chunk:
                raise ServerDied(f"the sandbox server exited (status {self.proc.poll()})")
            data += chunk
        return data

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # EOF: the server leaves its loop and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class ForkServerPool:
    """Idle servers shared by all threads of this process (a forked child starts its own pool)."""

    def __init__(self) -> None:
        self._idle: list[ForkServer] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @contextlib.contextmanager
    def server(self) -> Iterator[ForkServer]:
        with self._lock:
            if self._pid != os.getpid():  # inherited through fork: those servers belong to the parent
                self._idle, self._pid = [], os.getpid()
            server = self._idle.pop() if self._idle else None
        server = server if server is not None and server.alive else ForkServer()
        try:
            yield server
        except BaseException:
            server.close()  # it may be mid-protocol: never reuse it
            raise
        with self._lock:
            self._idle.append(server)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for server in idle:
            server.close()


POOL = ForkServerPool()
atexit.register(POOL.close)
