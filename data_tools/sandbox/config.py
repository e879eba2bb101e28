"""The sandbox's knobs (:class:`SandboxConfig`) and what one execution reports (:class:`ExecutionResult`)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from data_tools._common import DataToolError

VERDICTS = ("pass", "fail", "timeout", "compile_error", "runtime_error", "sandbox_error")
LANGUAGES = ("python", "c", "cpp", "java", "javascript", "go", "rust", "bash")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation for running untrusted programs. Every limit applies to each run separately
    (a sample with five stdin/stdout examples is five runs); compilers get the ``compile_*`` limits."""

    timeout_s: float = 10.0
    """Wall-clock limit of one run; the whole process tree is killed when it expires (verdict ``timeout``)."""
    cpu_s: float = 10.0
    """CPU-time limit of each process of a run (RLIMIT_CPU, rounded up to whole seconds; verdict ``timeout``)."""
    memory_mb: int = 1024
    """Private writable memory of each process (RLIMIT_DATA): heap, anonymous mappings, thread stacks.
    Unlike an address-space limit it does not count the large reservations of the JVM, V8 or Go."""
    max_processes: int = 64
    """Processes plus threads the program may have at once (RLIMIT_NPROC of its private uid)."""
    max_file_mb: int = 64
    """Largest file the program may write (RLIMIT_FSIZE), and the size of each private tmpfs."""
    max_output_bytes: int = 1 << 20
    """stdout longer than this is a ``runtime_error`` ("output limit exceeded"); stderr is cut here."""
    excerpt_chars: int = 2000
    """Characters of stdout/stderr kept in a result (head and tail, with the omitted middle counted)."""
    network: bool = False
    """Allow network access. By default each run gets an empty network namespace (not even loopback)."""
    workers: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """Samples validated at once by :func:`validate_samples` (each run is mostly waiting on its process)."""
    compile_timeout_s: float = 60.0
    """Wall-clock and CPU limit of the build step (gcc, javac, rustc, go build)."""
    compile_memory_mb: int = 2048
    """RLIMIT_DATA of the build step; compilers need more than the programs they build."""
    namespaces: bool | None = None
    """Run in new network/PID/mount/IPC namespaces (unshare(2)). None: when they work here;
    True: fail each run with ``sandbox_error`` if they do not; False: never (weaker, see docs/sandbox.md)."""
    drop_privileges: bool | None = None
    """Run programs under a private unprivileged uid. None: when running as root (the only case where
    it is possible); False: keep the caller's uid (then root's programs ignore the process limit)."""
    first_uid: int = 2_000_000_000
    """First of the uids leased to concurrent runs, one per run, so that process limits and clean-up
    never mix two runs. Pick a range that no account or file on the host uses."""
    uid_count: int = 1024
    """How many uids from ``first_uid`` on may be leased at once (across all processes on the host)."""
    tmp_root: str | None = None
    """Directory for the per-run work directories (None: the system temp dir). They are removed after the run."""
    progress: bool | None = None
    """Show a tqdm bar in :func:`validate_samples`. None: for batches of 32 or more samples on a terminal."""

    def __post_init__(self) -> None:
        positive = ("timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_output_bytes",
                    "excerpt_chars", "workers", "compile_timeout_s", "compile_memory_mb", "uid_count")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise DataToolError(f"SandboxConfig.{name}: expected a positive number, got {value!r}")
        if self.max_output_bytes > self.max_file_mb << 20:
            raise DataToolError(
                f"SandboxConfig.max_output_bytes: expected at most max_file_mb ({self.max_file_mb} MiB) because "
                f"output is written to files capped by it, got {self.max_output_bytes}; raise max_file_mb")
        if not 0 < self.first_uid <= 2**31 - 1 - self.uid_count:
            raise DataToolError(f"SandboxConfig.first_uid: expected 1..{2**31 - 1 - self.uid_count}, "
                                f"got {self.first_uid}")
        if self.tmp_root is not None and not os.path.isdir(self.tmp_root):
            raise DataToolError(f"SandboxConfig.tmp_root: {self.tmp_root!r} is not a directory; create it or "
                                "leave tmp_root unset for the system temp dir")


@dataclass
class ExecutionResult:
    """What happened when a program (or a sample's solution + tests) was built and run."""

    verdict: str
    """One of :data:`VERDICTS`; see docs/sandbox.md for exactly how each is decided per language."""
    returncode: int | None
    """Exit status of the last process run; negative: killed by that signal; None: nothing ran."""
    stdout_excerpt: str
    """Head and tail of stdout of the last run (for a build failure: of the compiler)."""
    stderr_excerpt: str
    """Head and tail of stderr of the last run (compiler diagnostics, tracebacks, assertion messages)."""
    wall_s: float
    """Wall-clock seconds of the build plus all runs, as measured around the program itself."""
    cpu_s: float
    """User + system CPU seconds of the build plus all runs (with their reaped children)."""
    isolation: str
    """The isolation that was in force, in words (namespaces, uid, limits, private dirs, or what was missing)."""
    message: str = ""
    """One sentence saying why this verdict (which example failed, which signal, which toolchain is missing)."""
    phase: str = "run"
    """Where the verdict was decided: ``setup``, ``build`` or ``run``."""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict:
        """The ``execution`` field written into a validated sample."""
        return dataclasses.asdict(self)


def excerpt(data: bytes, limit_chars: int) -> str:
    """Head and tail of ``data`` as text, so both the first compiler error and the last traceback line survive."""
    text = data.decode("utf-8", errors="replace")
    if len(text) <= limit_chars:
        return text
    half = limit_chars // 2
    return f"{text[:half]}\n...[{len(text) - 2 * half} characters omitted]...\n{text[-half:]}"
