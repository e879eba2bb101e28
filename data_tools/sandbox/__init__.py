"""Execution sandbox of the synthesis toolkit: build and run generated code with its tests, isolated.

Python, C, C++, Java, JavaScript, Go, Rust and Bash programs run where their toolchain is installed
(:func:`detect_toolchains`; a missing one gives verdict ``sandbox_error`` with install instructions).
Each run gets fresh network/PID/mount/IPC namespaces when permitted, a private uid, rlimits (CPU,
memory, processes, file size), a private work directory that is removed afterwards, and is killed
with its whole process tree at the wall-clock limit. Every :class:`ExecutionResult` says which
isolation was in force. Verdicts: pass, fail, timeout, compile_error, runtime_error, sandbox_error.

API::

    detect_toolchains() -> dict[language, Toolchain | None]
    run_program(language, source, *, stdin="", config) -> ExecutionResult
    validate_sample(sample, config) -> ExecutionResult
    validate_samples(samples, config) -> list[ExecutionResult]      # parallel, input order

CLI: ``python -m data_tools.sandbox --input samples.jsonl --output validated.jsonl``. See docs/sandbox.md.
"""
from data_tools.sandbox.cli import main
from data_tools.sandbox.config import LANGUAGES, VERDICTS, ExecutionResult, SandboxConfig
from data_tools.sandbox.runner import run_program
from data_tools.sandbox.toolchains import Toolchain, detect_toolchains
from data_tools.sandbox.validate import validate_sample, validate_samples

__all__ = ["LANGUAGES", "VERDICTS", "ExecutionResult", "SandboxConfig", "Toolchain", "detect_toolchains", "main",
           "run_program", "validate_sample", "validate_samples"]
