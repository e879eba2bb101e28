"""Per-language recipes: which files a sample becomes, how they are built and run, and which exit
statuses mean "a test assertion failed" or "the source does not compile".

Exit status 117 (``TEST_FAILED_EXIT``) is produced by a small harness per language (see ``harness/``)
when an assertion fails; 118 (``SYNTAX_ERROR_EXIT``) by the interpreted languages' syntax check. The
table of rules is in docs/sandbox.md ("Verdicts").

Every recipe also adds the completion step of completion.py: the marker is created only when control
comes back from the end of the tests (Python, Java: the harness, after the program's main code returns;
C, C++, Rust: a wrapper linked around ``main``; Go: a ``main`` that calls the renamed one; JavaScript,
Bash: a line appended after the tests), so an early ``exit(0)`` is not a pass.
"""
from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass, field

from data_tools.sandbox.completion import COMPLETION_ENV
from data_tools.sandbox.config import SandboxConfig
from data_tools.sandbox.toolchains import Toolchain

TEST_FAILED_EXIT = 117
SYNTAX_ERROR_EXIT = 118
HARNESS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness")
# Fast JVM start-up for short programs: one GC thread, C1 only, no shared perf-data file in /tmp.
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xshare:auto")


@dataclass(frozen=True)
class Program:
    """A sample turned into files and commands; argv are run with the work directory as cwd."""

    files: dict
    """File name -> text, written into the work directory (harness files included)."""
    run: tuple
    """argv that runs the program."""
    build: tuple | None = None
    """argv of the build step; None when there is nothing to build."""
    env: dict = field(default_factory=dict)
    """Extra environment for both steps."""
    fail_codes: frozenset = frozenset({TEST_FAILED_EXIT})
    """Exit statuses of ``run`` that mean a test assertion failed (verdict ``fail``)."""
    syntax_codes: frozenset = frozenset()
    """Exit statuses of ``run`` that mean the source does not compile (verdict ``compile_error``)."""
    problem: str | None = None
    """Set when the sample cannot even be turned into a program (e.g. Java without a main method)."""
    inline_python: bool = False
    """``run`` is ``python -I script ...`` of the interpreter running the toolkit: the sandbox's fork server
    may run the script in its forked, isolated interpreter instead of starting a new one."""


def harness_source(name: str) -> str:
    with open(os.path.join(HARNESS_DIR, name), encoding="utf-8") as f:
        return f.read()


def joined(*parts: str) -> str:
    return "\n\n".join(part.rstrip("\n") for part in parts if part.strip()) + "\n"


def python_test_calls(tests: str, entry_point: str | None) -> str:
    """Calls that make tests written for a collector actually run, appended after the tests.

    Without them such tests would define checks and exit 0 untested. Added only for what the tests
    define but never call: HumanEval's ``check`` (as ``check(<entry_point>)``), pytest-style
    ``test_*()`` functions without parameters, and unittest.TestCase classes (via unittest.main()).
    """
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return ""  # the combined program then fails to compile, which says more than guessing here
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    called |= {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Attribute)}
    calls = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name not in called:
            if node.name == "check" and entry_point:
                calls.append(f"check({entry_point})")
            elif node.name.startswith("test") and not (node.args.args or node.args.posonlyargs):
                calls.append(f"{node.name}()")
    has_test_case = any(isinstance(node, ast.ClassDef) and any(
        isinstance(base, (ast.Name, ast.Attribute)) and ast.unparse(base).endswith("TestCase")
        for base in node.bases) for node in tree.body)
    if has_test_case and "main" not in called:
        calls.append("import unittest as _sandbox_unittest\n_sandbox_unittest.main(argv=['main.py'])")
    return "\n".join(calls)


def _python(tc: Toolchain, solution: str, tests: str, entry_point: str | None, config: SandboxConfig) -> Program:
    source = joined(solution, tests, python_test_calls(tests, entry_point))
    return Program({"main.py": source, "_sandbox_harness.py": harness_source("python_harness.py")},
                   run=(tc.programs["python"], "-I", "_sandbox_harness.py", "main.py"),
                   syntax_codes=frozenset({SYNTAX_ERROR_EXIT}), inline_python=tc.programs["python"] == sys.executable)


def _c_family(tc: Toolchain, source_name: str, standard: str, solution: str, tests: str) -> Program:
    files = {source_name: joined(solution, tests), "sandbox_assert.c": harness_source("sandbox_assert.c"),
             "sandbox_main.c": harness_source("sandbox_main.c")}
    build = (tc.programs["compiler"], f"-std={standard}", "-O2", "-pipe", "-o", "main", source_name,
             "sandbox_assert.c", "sandbox_main.c", "-lm", "-Wl,--wrap=__assert_fail", "-Wl,--wrap=main")
    return Program(files, run=("./main",), build=build)


def _c(tc, solution, tests, entry_point, config) -> Program:
    return _c_family(tc, "main.c", "gnu17", solution, tests)


def _cpp(tc, solution, tests, entry_point, config) -> Program:
    return _c_family(tc, "main.cpp", "gnu++17", solution, tests)


JAVA_PUBLIC_TYPE = re.compile(r"^\s*public\s+(?:(?:final|abstract|sealed|strictfp)\s+)*"
                              r"(?:class|interface|enum|record)\s+(\w+)", re.M)
JAVA_TYPE = re.compile(r"\b(?:class|interface|enum|record)\s+(\w+)")
JAVA_MAIN = re.compile(r"\bstatic\s+(?:final\s+)?void\s+main\s*\(")
JAVA_PACKAGE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.M)


def java_main_class(source: str) -> str | None:
    """The (package-qualified) class declaring ``static void main``: the last type declared before it."""
    found = JAVA_MAIN.search(source)
    if not found:
        return None
    names = JAVA_TYPE.findall(source[:found.start()])
    if not names:
        return None
    package = JAVA_PACKAGE.search(source)
    return f"{package.group(1)}.{names[-1]}" if package else names[-1]


def _java(tc: Toolchain, solution: str, tests: str, entry_point: str | None, config: SandboxConfig) -> Program:
    # Separate compilation units, each named after its public type, so each keeps its own imports.
    files = {"SandboxHarness.java": harness_source("SandboxHarness.java")}
    for text, fallback in ((solution, "Solution"), (tests, "Tests")):
        if text.strip():
            public = JAVA_PUBLIC_TYPE.search(text)
            name = f"{public.group(1) if public else fallback}.java"
            files[name if name not in files else f"{fallback}_{len(files)}.java"] = text
    main_class = next((m for m in (java_main_class(tests), java_main_class(solution)) if m), None)
    build = (tc.programs["javac"], *(f"-J{flag}" for flag in JVM_FLAGS), f"-J-Xmx{config.compile_memory_mb // 2}m",
             "-encoding", "UTF-8", "-nowarn", "-d", ".", *sorted(files))
    run = (tc.programs["java"], "-ea", *JVM_FLAGS, f"-Xmx{max(32, config.memory_mb // 2)}m",
           "-Djava.io.tmpdir=.", "-cp", ".", "SandboxHarness", main_class or "")
    problem = None if main_class else "no class declares `public static void main(String[])` in solution or tests"
    return Program(files, run=run, build=build, problem=problem)


JS_ESM_SYNTAX = re.compile(r"^\s*(?:import\s+[\w{*'\"]|export\s)", re.M)
# Defined by harness.js; the leading semicolon keeps it a statement of its own after any last line.
JS_COMPLETION_CALL = ";globalThis.__mcodeSandboxTestsCompleted();"


def _javascript(tc, solution, tests, entry_point, config) -> Program:
    source = joined(solution, tests, JS_COMPLETION_CALL)
    main = "main.mjs" if JS_ESM_SYNTAX.search(source) else "main.js"
    node = tc.programs["node"]
    run = (node, f"--max-old-space-size={max(16, config.memory_mb * 3 // 4)}", "--require",
           "./_sandbox_harness.js", main)
    # A CommonJS main is syntax-checked by the preloaded harness; an ES module needs node --check.
    build = (node, "--check", main) if main.endswith(".mjs") else None
    return Program({main: source, "_sandbox_harness.js": harness_source("harness.js")}, run=run, build=build,
                   env={"UV_THREADPOOL_SIZE": "2"}, syntax_codes=frozenset({SYNTAX_ERROR_EXIT}))


GO_MAIN = re.compile(r"^func\s+main\s*\(\s*\)", re.M)
GO_RENAMED_MAIN = "mcodeSandboxTestsMain"  # the name harness/sandbox_completion.go calls


def go_files(solution: str, tests: str) -> dict:
    """solution.go, tests.go, and the completion step: the file declaring ``func main()`` (the tests, or
    the solution when there are none) gets it renamed, and harness/sandbox_completion.go calls it.
    Without any main nothing is renamed, and go build says that main is missing."""
    files = {"solution.go": solution} | ({"tests.go": tests} if tests.strip() else {})
    for name in reversed(files):
        if GO_MAIN.search(files[name]):
            files[name] = GO_MAIN.sub(f"func {GO_RENAMED_MAIN}()", files[name], count=1)
            return files | {"sandbox_completion.go": harness_source("sandbox_completion.go")}
    return files


def _go(tc, solution, tests, entry_point, config) -> Program:
    files = go_files(solution, tests)
    build = (tc.programs["go"], "build", "-o", "main", *files)
    # Go's build cache lives under $HOME (the work dir); no toolchain downloads, no proxy, no cgo.
    env = {"GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0",
           "GOMAXPROCS": "2"}
    # Go has no assert: tests report a failed check with a non-zero exit (os.Exit(1), log.Fatal); a panic is 2.
    return Program(files, run=("./main",), build=build, env=env, fail_codes=frozenset({1}))


RUST_TEST_ATTRIBUTE = re.compile(r"#\[\s*test\s*\]")


def _rust(tc, solution, tests, entry_point, config) -> Program:
    source = joined(solution, tests) + harness_source("panic_hook.rs") + harness_source("completion.rs")
    as_tests = bool(RUST_TEST_ATTRIBUTE.search(source))  # #[test] functions: build libtest's runner
    build = (tc.programs["rustc"], "--edition", "2021", "-O", "-A", "warnings", "-C", "debuginfo=0",
             "-C", "link-arg=-Wl,--wrap=main", "-o", "main", "main.rs", *(("--test",) if as_tests else ()))
    run = ("./main", "--test-threads=1") if as_tests else ("./main",)
    return Program({"main.rs": source}, run=run, build=build)


# Appended after the tests; keeps the script's own exit status (that of its last command).
BASH_COMPLETION = ("__mcode_sandbox_status=$?\n"
                   f'if [ -n "${{{COMPLETION_ENV}-}}" ]; then : 2>/dev/null >"${COMPLETION_ENV}" || :; fi\n'
                   'exit "$__mcode_sandbox_status"')


def _bash(tc, solution, tests, entry_point, config) -> Program:
    bash = tc.programs["bash"]
    check_then_run = f'"$0" -n main.sh || exit {SYNTAX_ERROR_EXIT}; exec "$0" main.sh'
    # Bash has no assert: a test fails with `exit 1` (or `false`/`[ ]` under set -e); other codes are errors.
    return Program({"main.sh": joined(solution, tests, BASH_COMPLETION)}, run=(bash, "-c", check_then_run, bash),
                   fail_codes=frozenset({1}), syntax_codes=frozenset({SYNTAX_ERROR_EXIT}))


RECIPES = {"python": _python, "c": _c, "cpp": _cpp, "java": _java, "javascript": _javascript, "go": _go,
           "rust": _rust, "bash": _bash}


def prepare(language: str, toolchain: Toolchain, solution: str, tests: str, entry_point: str | None,
            config: SandboxConfig) -> Program:
    """Turn solution + tests into a :class:`Program` for ``language`` (a key of :data:`RECIPES`)."""
    return RECIPES[language](toolchain, solution, tests, entry_point, config)
