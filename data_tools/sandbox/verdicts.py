"""How the outcome of a build or run becomes a verdict, and how stdout is compared with expected output.

These are the rules docs/sandbox.md states; keep the two in step.
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from data_tools.sandbox.completion import NOT_COMPLETED_MESSAGE
from data_tools.sandbox.recipes import Program

# Messages runtimes print when an allocation fails, to say "memory limit" instead of just "crashed".
OUT_OF_MEMORY = re.compile(rb"MemoryError|std::bad_alloc|OutOfMemoryError|heap out of memory|"
                           rb"memory allocation of \d+ bytes failed|Array buffer allocation failed|"
                           rb"Cannot allocate memory|out of memory")


@dataclass
class StepOutcome:
    """What jail.py (or, when it was killed, the runner) observed for one build or run."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    cpu_s: float
    wall_s: float
    stdout: bytes
    stdout_size: int
    stderr: bytes
    error: str | None = None

    @property
    def returncode(self) -> int | None:
        return -self.signal if self.signal else self.exit_code


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def judge_build(outcome: StepOutcome, timeout_s: float) -> tuple[str, str] | None:
    """(verdict, message) when the build did not succeed, else None."""
    if outcome.error:
        return "sandbox_error", outcome.error
    if outcome.timed_out or outcome.signal == signal.SIGXCPU:
        return "compile_error", f"the build did not finish within the compile limit of {timeout_s:g} s"
    if outcome.signal:
        return "compile_error", f"the compiler was killed by {signal_name(outcome.signal)}"
    if outcome.exit_code:
        return "compile_error", f"the compiler exited with status {outcome.exit_code}"
    return None


def judge_run(outcome: StepOutcome, program: Program, *, timeout_s: float, cpu_s: float,
              max_output_bytes: int, tests_mode: bool, tests_completed: bool) -> tuple[str, str]:
    """(verdict, message) of one run; ``tests_mode`` is False for stdin/stdout examples, where a
    non-zero exit is always a crash (the examples, not the program, decide pass or fail). In tests
    mode exit 0 is a pass only with ``tests_completed`` (the run left its completion marker)."""
    if outcome.error:
        return "sandbox_error", outcome.error
    if outcome.timed_out:
        return "timeout", f"killed at the wall-clock limit of {timeout_s:g} s"
    if outcome.signal == signal.SIGXCPU or (outcome.signal == signal.SIGKILL and outcome.cpu_s >= cpu_s):
        return "timeout", f"killed at the CPU limit of {cpu_s:g} s"
    if outcome.stdout_size > max_output_bytes:
        return "runtime_error", f"output limit exceeded ({outcome.stdout_size} > {max_output_bytes} bytes)"
    if outcome.signal:
        extra = " (file size limit)" if outcome.signal == signal.SIGXFSZ else _memory_hint(outcome)
        return "runtime_error", f"killed by {signal_name(outcome.signal)}{extra}"
    code = outcome.exit_code
    if code == 0:
        if tests_mode and not tests_completed:
            return "fail", NOT_COMPLETED_MESSAGE
        return "pass", "exited with status 0"
    if code in program.syntax_codes:
        return "compile_error", "the source does not compile (syntax check failed)"
    if tests_mode and code in program.fail_codes:
        return "fail", f"a test assertion failed (exit status {code})"
    return "runtime_error", f"exited with status {code}{_memory_hint(outcome)}"


def _memory_hint(outcome: StepOutcome) -> str:
    return " (out of memory: memory limit reached)" if OUT_OF_MEMORY.search(outcome.stderr) else ""


def normalize_output(text: str) -> list[str]:
    """Lines with runs of whitespace collapsed to one space and stripped at both ends; blank lines at
    the start and end dropped. So trailing spaces, CRLF and a missing final newline never matter,
    but line breaks and the order of tokens do."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return lines


def outputs_match(actual: bytes, expected: str) -> bool:
    return normalize_output(actual.decode("utf-8", errors="replace")) == normalize_output(expected)
