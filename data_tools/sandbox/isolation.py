"""Which isolation a run gets on this machine, and the pieces that set it up outside the jail.

The strongest available mode is chosen, and every result says which one was in force:

- **root + namespaces** (the intended mode): unshare(2) gives each run fresh network, PID, mount and
  IPC namespaces (what ``unshare --net --pid --fork --mount-proc --ipc`` does); jail.py mounts private
  tmpfs over the world-writable directories, hides $HOME and drops to a uid leased to this run alone.
  Processes cannot reach the network or see the host's processes; files can be written only in the
  run's work directory (and its private tmpfs).
- **non-root + namespaces**: the same inside a user namespace; the program keeps the caller's uid with
  every capability dropped, so files the caller may write outside the hidden/private dirs stay writable.
- **no namespaces** (unshare(2) not permitted, e.g. under Docker's default seccomp profile): only
  rlimits, a process group and (as root) the leased uid. The network is NOT isolated.

A leased uid is what makes RLIMIT_NPROC a per-run limit (it counts all processes of a uid) and lets
the jail kill every leftover process of a run by uid: leases are abstract unix sockets bound to a
per-uid name, so they coordinate all processes on the host and vanish with their holder.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from data_tools.sandbox.config import SandboxConfig
from data_tools.sandbox.forkserver import JAIL
from data_tools.sandbox.toolchains import detect_toolchains

# World-writable places a program could otherwise leave files in (or fill) on the host.
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Never hidden even when they look like a home directory (a service account's $HOME may be /).
SYSTEM_DIRS = {"/", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev", "/opt", "/var", "/run"}


@dataclass(frozen=True)
class IsolationPlan:
    """How runs are isolated here; built once per (config, machine) by :func:`plan_isolation`."""

    namespaces: bool
    """New network (unless allowed), PID, mount and IPC namespaces."""
    user_namespace: bool
    """Namespaces are created inside a user namespace (non-root); capabilities are dropped for the program."""
    drop_privileges: bool
    """Programs run under a leased uid (root only)."""
    network_isolated: bool
    """The program sees an empty network namespace."""
    covers: tuple
    """(directory, mode) pairs covered by an empty private tmpfs inside the mount namespace."""
    error: str | None
    """Why runs cannot go ahead as configured (e.g. namespaces required but unavailable); None when they can."""
    description: str
    """The isolation in words, copied into every :class:`ExecutionResult`."""


@functools.lru_cache(maxsize=4)
def probe_namespaces(user_namespace: bool) -> tuple[bool, str]:
    """(works, reason): can we unshare(2) every namespace and mount inside? Checked once per process."""
    argv = [sys.executable, "-I", "-S", JAIL, "--probe", "user" if user_namespace else "root"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"the namespace probe could not run: {exc}"
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or f"exit status {proc.returncode}").splitlines()
        return False, f"unshare(2) is not permitted here: {lines[-1]}"
    return True, ""


def plan_isolation(config: SandboxConfig) -> IsolationPlan:
    return _plan(config.namespaces, config.drop_privileges, config.network, config.timeout_s, config.cpu_s,
                 config.memory_mb, config.max_processes, config.max_file_mb)


@functools.lru_cache(maxsize=64)
def _plan(namespaces, drop_privileges, network, timeout_s, cpu_s, memory_mb, max_processes, max_file_mb):
    root = os.geteuid() == 0
    error = None
    use_ns, reason = False, "disabled by config (namespaces=False)"
    if namespaces is not False:
        use_ns, reason = probe_namespaces(user_namespace=not root)
        if namespaces and not use_ns:
            error = f"namespaces are required (namespaces=True) but unavailable: {reason}"
    drop = root if drop_privileges is None else drop_privileges
    if drop and not root:
        error = "drop_privileges=True needs root (only root can switch to another uid); leave it unset"
    covers = _covers(_toolchain_roots() if drop else ()) if use_ns else ()
    limits = (f"rlimits: cpu {cpu_s:g} s, data {memory_mb} MB, nproc {max_processes}, fsize {max_file_mb} MB; "
              f"wall {timeout_s:g} s; whole process tree killed at exit")
    parts = [_namespace_words(use_ns, not root, network, reason), _identity_words(drop, root, use_ns)]
    if covers:
        parts.append("private tmpfs: " + ", ".join(path for path, mode in covers if mode == 0o1777)
                     + "; hidden: " + (", ".join(path for path, mode in covers if mode != 0o1777) or "nothing"))
    parts.append(limits)
    return IsolationPlan(use_ns, use_ns and not root, drop, use_ns and not network, covers, error,
                         "; ".join(parts))


def _namespace_words(use_ns: bool, user_ns: bool, network: bool, reason: str) -> str:
    if not use_ns:
        return f"NO namespaces ({reason}): network NOT isolated, host processes visible"
    kinds = ["pid", "mount", "ipc"] + ([] if network else ["net"])
    words = "namespaces: " + ", ".join(["user (no capabilities)"] * user_ns + kinds)
    return words + ("; network ALLOWED by config" if network else "")


def _identity_words(drop: bool, root: bool, use_ns: bool) -> str:
    if drop:
        return "runs as a leased unprivileged uid (no_new_privs)"
    if root:
        return "runs as ROOT (drop_privileges=False): files are NOT protected and the process limit is NOT enforced"
    where = "outside the hidden and private dirs " if use_ns else ""
    return f"runs as the caller's uid: files the caller may write {where}are NOT protected"


def _toolchain_roots() -> tuple:
    return tuple(root for toolchain in detect_toolchains().values() if toolchain for root in toolchain.install_roots)


def _covers(toolchain_roots: tuple) -> tuple:
    """Dirs to cover with a private tmpfs: world-writable ones (mode 1777, private), and hidden ones
    (mode 755): $HOME and any directory that would stop the leased uid from reaching a toolchain
    (jail.py binds the toolchain back, read-only)."""
    shared = []
    for path in (*SHARED_WRITABLE_DIRS, tempfile.gettempdir()):
        real = os.path.realpath(path)
        if os.path.isdir(real) and os.stat(real).st_mode & stat.S_IWOTH and real not in shared:
            shared.append(real)
    hidden = [os.path.realpath(os.path.expanduser("~"))]
    hidden += [blocker for root in toolchain_roots if (blocker := _first_untraversable(root))]
    hidden = [path for path in dict.fromkeys(hidden) if os.path.isdir(path) and path not in SYSTEM_DIRS]
    covers = [(path, 0o1777) for path in shared] + [(path, 0o755) for path in hidden]
    # A directory inside another cover is already hidden by it (and could not be mounted on after it).
    return tuple((path, mode) for path, mode in covers
                 if not any(other != path and _is_under(path, other) for other, _ in covers))


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _first_untraversable(path: str) -> str | None:
    """The outermost directory on the way to ``path`` that others may not enter, if any."""
    parts = os.path.realpath(path).split("/")[1:]
    for depth in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:depth])
        with contextlib.suppress(OSError):
            if not os.stat(prefix).st_mode & stat.S_IXOTH:
                return prefix
    return None


def unreachable_reason(roots: tuple, plan: IsolationPlan) -> str | None:
    """Why a leased uid cannot use a toolchain installed under ``roots`` (None when it can).

    With a mount namespace hidden ancestors are bound back, so only the no-namespace root mode can
    hit this: e.g. rustup or pyenv under /root, which is mode 0700.
    """
    if not plan.drop_privileges or plan.namespaces:
        return None
    for root in roots:
        blocker = _first_untraversable(root)
        if blocker:
            return (f"{root} is not reachable by the sandbox uid ({blocker} is mode "
                    f"{stat.S_IMODE(os.stat(blocker).st_mode):o}) and mount namespaces are unavailable; "
                    "install the toolchain system-wide or allow namespaces (e.g. docker run --privileged)")
    return None


def nproc_limit(plan: IsolationPlan, max_processes: int) -> int:
    """RLIMIT_NPROC for a run; the kernel counts it per uid (per user namespace since Linux 5.14)."""
    if plan.drop_privileges:  # the leased uid runs nothing but this program
        return max_processes
    if plan.user_namespace:  # counted per (user namespace, uid): the program, the run's init and request process
        return max_processes + 2
    # The caller's own uid: all its processes on the host count, so allow for them (and the jail).
    return max_processes + 1 + _count_tasks_of(os.getuid())


def _count_tasks_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


_next_uid_offset = itertools.count()
_offset_lock = threading.Lock()


@contextlib.contextmanager
def lease_uid(config: SandboxConfig, plan: IsolationPlan) -> Iterator[int | None]:
    """Hold a uid of [first_uid, first_uid + uid_count) that no other run on the host holds (None when
    programs keep the caller's uid). Waits when all are taken."""
    if not plan.drop_privileges:
        yield None
        return
    with _offset_lock:
        start = next(_next_uid_offset)
    while True:
        for step in range(config.uid_count):
            uid = config.first_uid + (start + step) % config.uid_count
            lease = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lease.bind(f"\0mcode-sandbox-uid-{uid}")
            except OSError:
                lease.close()
                continue
            try:
                yield uid
            finally:
                lease.close()
            return
        time.sleep(0.05)


def kill_uid_processes(uid: int) -> None:
    """Kill every process of a leased uid (backstop when the jail itself was killed)."""
    subprocess.run([sys.executable, "-I", "-S", JAIL, "--kill-uid", str(uid)], check=False,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
