"""Build and run one program in the sandbox: a private work directory, one fork-server request per
step (build, then each run), and the verdict. :func:`run_program` is the public entry;
:func:`execute` also serves samples."""
from __future__ import annotations

import contextlib
import functools
import marshal
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from data_tools.sandbox.completion import COMPLETION_ENV, new_marker_path, tests_completed
from data_tools.sandbox.config import LANGUAGES, ExecutionResult, SandboxConfig, excerpt
from data_tools.sandbox.forkserver import POOL, ServerDied
from data_tools.sandbox.isolation import (IsolationPlan, kill_uid_processes, lease_uid, nproc_limit, plan_isolation,
                                          unreachable_reason)
from data_tools.sandbox.recipes import Program, prepare
from data_tools.sandbox.toolchains import Toolchain, detect_toolchains, missing_toolchain_message
from data_tools.sandbox.verdicts import StepOutcome, judge_build, judge_run, outputs_match

MIB = 1 << 20
# Processes a compiler may start (gcc's cc1/as/ld; javac's and rustc's threads count as processes too).
BUILD_MAX_PROCESSES = 256
# A run is killed from outside this long after its own supervisor's wall-clock limit should have fired.
BACKSTOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Limits:
    """The limits of one step, in the units jail.py applies them."""

    timeout_s: float
    cpu_s: float
    memory_mb: int
    max_processes: int


WORKSPACE_PREFIX = "mcode-sandbox-"


class Workspace:
    """A per-run directory ``<tmp>/mcode-sandbox-<pid>-XXXX/`` (mode 711) holding the program's ``work/``
    (owned by the leased uid) and, out of the program's reach, its stdin/stdout/stderr and status."""

    def __init__(self, config: SandboxConfig, uid: int | None) -> None:
        root = os.path.abspath(config.tmp_root or tempfile.gettempdir())
        sweep_orphaned_workspaces(root)
        self.base = tempfile.mkdtemp(prefix=f"{WORKSPACE_PREFIX}{os.getpid()}-", dir=root)
        os.chmod(self.base, 0o711)  # the program may traverse to work/ but not list or open the rest
        self.work = os.path.join(self.base, "work")
        os.mkdir(self.work, 0o700)
        if uid is not None:
            os.chown(self.work, uid, uid)

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def write_files(self, files: dict) -> None:
        for name, text in files.items():
            with open(os.path.join(self.work, name), "w", encoding="utf-8") as f:
                f.write(text)

    def remove(self) -> None:
        shutil.rmtree(self.base, onerror=_make_writable_and_retry)


@functools.lru_cache(maxsize=None)
def sweep_orphaned_workspaces(root: str) -> None:
    """Remove work directories under ``root`` left by processes that died mid-run (killed before their
    clean-up could run); once per process and root. A directory whose creator is alive is left alone."""
    for name in os.listdir(root):
        owner = name[len(WORKSPACE_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        if not (name.startswith(WORKSPACE_PREFIX) and owner.isdigit()):
            continue
        try:
            if os.lstat(path).st_uid == os.geteuid():
                os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(path, onerror=_make_writable_and_retry)
        except (FileNotFoundError, PermissionError):
            pass  # gone meanwhile, or its creator is alive under another uid


def _make_writable_and_retry(func, path, _exc_info) -> None:
    # A program may leave a directory without write permission; as non-root we must restore it first.
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
    with contextlib.suppress(FileNotFoundError):
        func(path)


def _program_env(toolchain_programs: dict, workdir: str, extra: dict) -> dict:
    bins = dict.fromkeys(os.path.dirname(p) for p in toolchain_programs.values())
    path = ":".join([*bins, "/usr/local/bin", "/usr/bin", "/bin"])
    return {"PATH": path, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **extra}


def _spec(ws: Workspace, plan: IsolationPlan, program: Program, argv: tuple, env: dict, limits: Limits,
          uid: int | None, config: SandboxConfig, visible: tuple) -> dict:
    """What jail.py needs for one step (see its docstring); plain types only (it is marshalled)."""
    cpu = max(1, math.ceil(limits.cpu_s))
    data = limits.memory_mb * MIB
    fsize = config.max_file_mb * MIB
    # The stack's soft limit stays at the usual 8 MiB because glibc sizes every thread's stack by it
    # (and they count as data); a program may raise it up to the memory limit.
    rlimits = {"cpu": (cpu, cpu + 1), "data": (data, data), "fsize": (fsize, fsize), "core": (0, 0),
               "stack": (min(8 * MIB, data), data), "nofile": (1024, 1024),
               "nproc": (limits.max_processes, limits.max_processes)}
    return {"argv": list(argv), "env": env, "workdir": ws.work, "status": ws.path("status"),
            "stdin": ws.path("stdin"), "stdout": ws.path("stdout"), "stderr": ws.path("stderr"),
            "timeout_s": limits.timeout_s, "rlimits": rlimits, "uid": uid, "namespaces": plan.namespaces,
            "network": config.network, "user_namespace": plan.user_namespace, "drop_caps": plan.user_namespace,
            "covers": list(plan.covers), "visible": [(ws.work, False), *[(root, True) for root in visible]],
            "tmpfs_mb": config.max_file_mb, "inline_python": program.inline_python and argv == program.run}


def run_step(ws: Workspace, plan: IsolationPlan, spec: dict, stdin: bytes, config: SandboxConfig) -> StepOutcome:
    """Have a fork server run ``spec`` with ``stdin``; collect the status and the (capped) output."""
    with open(ws.path("stdin"), "wb") as f:
        f.write(stdin)
    with contextlib.suppress(FileNotFoundError):
        os.remove(ws.path("status"))
    started = time.monotonic()
    try:
        with POOL.server() as server:
            finished = server.run(spec, spec["timeout_s"] + BACKSTOP_GRACE_S)
    except ServerDied as exc:
        finished, died = True, str(exc)
    else:
        died = None
    wall_s = time.monotonic() - started
    status = _read_status(ws.path("status"))
    if status is None and spec["uid"] is not None and not plan.namespaces:
        kill_uid_processes(spec["uid"])  # the jail died before it could clean up after the program
    stdout, stdout_size = _read_capped(ws.path("stdout"), config.max_output_bytes)
    stderr, _ = _read_capped(ws.path("stderr"), config.max_output_bytes)
    if status is None:
        error = died or (None if not finished else "the sandbox supervisor ended without a result")
        status = {"timed_out": not finished, "error": error}
    return StepOutcome(status.get("exit"), status.get("signal"), status.get("timed_out", False),
                       status.get("cpu_s", 0.0), status.get("wall_s", wall_s), stdout, stdout_size, stderr,
                       status.get("error"))


def _read_status(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            return marshal.load(f)
    except (FileNotFoundError, EOFError, ValueError, TypeError):
        return None


def _read_capped(path: str, limit: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1), os.fstat(f.fileno()).st_size
    except FileNotFoundError:  # the program never started
        return b"", 0


@dataclass
class _Tally:
    """Time spent over the steps of one execution, and the last step seen (for the result's excerpts)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    last: StepOutcome | None = None

    def add(self, outcome: StepOutcome) -> StepOutcome:
        self.wall_s += outcome.wall_s
        self.cpu_s += outcome.cpu_s
        self.last = outcome
        return outcome


def _result(verdict: str, message: str, tally: _Tally, plan: IsolationPlan, config: SandboxConfig,
            phase: str) -> ExecutionResult:
    last = tally.last
    return ExecutionResult(
        verdict=verdict, returncode=last.returncode if last else None,
        stdout_excerpt=excerpt(last.stdout, config.excerpt_chars) if last else "",
        stderr_excerpt=excerpt(last.stderr, config.excerpt_chars) if last else "",
        wall_s=round(tally.wall_s, 4), cpu_s=round(tally.cpu_s, 4), isolation=plan.description,
        message=message, phase=phase)


def _setup_problem(language: str, plan: IsolationPlan) -> str | None:
    """Why nothing can run for ``language`` here (sandbox misconfigured, toolchain missing), or None."""
    if plan.error:
        return plan.error
    toolchain = detect_toolchains().get(language)
    if toolchain is None:
        return missing_toolchain_message(language)
    return unreachable_reason(toolchain.install_roots, plan)


def execute(language: str, solution: str, tests: str, entry_point: str | None, stdins: list[str],
            expected: list[str] | None, config: SandboxConfig) -> ExecutionResult:
    """Build once, then run once per stdin; with ``expected``, each run's stdout must match it.

    Stops at the first run that does not pass. The verdict rules are in :mod:`verdicts`.
    """
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    plan = plan_isolation(config)
    tally = _Tally()
    problem = _setup_problem(language, plan)
    if problem:
        return _result("sandbox_error", problem, tally, plan, config, "setup")
    toolchain = detect_toolchains()[language]
    program = prepare(language, toolchain, solution, tests, entry_point, config)
    if program.problem:
        return _result("compile_error", program.problem, tally, plan, config, "build")
    try:
        with lease_uid(config, plan) as uid:
            ws = Workspace(config, uid)
            try:
                ws.write_files(program.files)
                return _build_and_run(ws, plan, uid, program, toolchain, stdins, expected, config, tally)
            finally:
                ws.remove()
    except OSError as exc:  # the host, not the program: disk full, fork refused, ...
        return _result("sandbox_error", f"the sandbox could not run the program: {exc}", tally, plan, config, "setup")


def _build_and_run(ws: Workspace, plan: IsolationPlan, uid: int | None, program: Program, toolchain: Toolchain,
                   stdins: list[str], expected: list[str] | None, config: SandboxConfig,
                   tally: _Tally) -> ExecutionResult:
    env = _program_env(toolchain.programs, ws.work, program.env)
    roots = toolchain.install_roots
    if program.build:
        limits = Limits(config.compile_timeout_s, config.compile_timeout_s, config.compile_memory_mb,
                        nproc_limit(plan, max(BUILD_MAX_PROCESSES, config.max_processes)))
        outcome = tally.add(run_step(ws, plan, _spec(ws, plan, program, program.build, env, limits, uid, config,
                                                     roots), b"", config))
        failed = judge_build(outcome, config.compile_timeout_s)
        if failed:
            return _result(*failed, tally, plan, config, "build")
    limits = Limits(config.timeout_s, config.cpu_s, config.memory_mb, nproc_limit(plan, config.max_processes))
    for index, stdin in enumerate(stdins):
        # With tests, a fresh completion marker per run (completion.py); stdin/stdout runs need none.
        marker = new_marker_path(ws.work) if expected is None else None
        run_env = (env | {COMPLETION_ENV: marker}) if marker else env
        spec = _spec(ws, plan, program, program.run, run_env, limits, uid, config, roots)
        outcome = tally.add(run_step(ws, plan, spec, stdin.encode("utf-8"), config))
        verdict, message = judge_run(outcome, program, timeout_s=config.timeout_s, cpu_s=config.cpu_s,
                                     max_output_bytes=config.max_output_bytes, tests_mode=expected is None,
                                     tests_completed=marker is not None and tests_completed(marker))
        if verdict == "pass" and expected is not None and not outputs_match(outcome.stdout, expected[index]):
            verdict, message = "fail", "stdout differs from the expected output"
        if expected is not None and verdict != "pass":
            message = f"example {index + 1} of {len(stdins)}: {message}"
        if verdict != "pass":
            return _result(verdict, message, tally, plan, config, "run")
    what = (f"all {len(stdins)} examples matched" if expected is not None
            else "the tests ran to their end and the program exited with status 0")
    return _result("pass", what, tally, plan, config, "run")


def run_program(language: str, source: str, *, stdin: str = "", config: SandboxConfig | None = None) -> ExecutionResult:
    """Run one program (built first for compiled languages) with ``stdin``.

    The verdict follows the same rules as a sample whose tests are inside ``source``: running to the
    end of ``source`` and exiting 0 is ``pass`` (an early ``exit(0)`` is ``fail``), a failed assertion
    ``fail``, see docs/sandbox.md. The output is in ``stdout_excerpt``.
    """
    return execute(language, source, "", None, [stdin], None, config or SandboxConfig())
