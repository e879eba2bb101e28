"""The execution sandbox (data_tools.sandbox): verdicts per language, isolation, host left untouched.

Most cases run as one parallel batch (``batch`` fixture) so that compilers and timeouts overlap;
each case is then checked by its own test. Cases in a language whose toolchain is absent are
skipped, except Go, whose absence must itself give a loud sandbox_error.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid

import pytest

from data_tools._common import DataToolError
from data_tools.sandbox import (ExecutionResult, SandboxConfig, detect_toolchains, main, run_program,
                                validate_sample, validate_samples)
from data_tools.sandbox.completion import COMPLETION_ENV, NOT_COMPLETED_MESSAGE
from data_tools.sandbox.isolation import plan_isolation, unreachable_reason
from data_tools.sandbox.recipes import GO_RENAMED_MAIN, go_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = f"sandbox-test-marker-{uuid.uuid4().hex[:12]}"
TOOLCHAINS = detect_toolchains()
IS_ROOT = os.geteuid() == 0


def sample(language, solution, tests="", **extra):
    return {"id": uuid.uuid4().hex[:16], "language": language, "solution": textwrap.dedent(solution),
            "tests": textwrap.dedent(tests), "test_format": "script", **extra}


def io_sample(language, solution, examples):
    return sample(language, solution, test_format="stdin_stdout",
                  io_examples=[{"input": i, "output": o} for i, o in examples])


class Host:
    """Things on the host the programs try to reach: a TCP server and places to write files."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        # World-writable, so that only the private mount namespace (not file permissions) protects it.
        self.shared_dir = tempfile.mkdtemp(prefix="sandbox-test-shared-")
        os.chmod(self.shared_dir, 0o777)
        self.targets = [os.path.join(self.shared_dir, "escaped"), os.path.expanduser(f"~/{MARKER}-home"),
                        f"/tmp/{MARKER}-tmp", f"/var/tmp/{MARKER}-vartmp", f"/dev/shm/{MARKER}-shm"]
        self.tmp_root = tempfile.mkdtemp(prefix="sandbox-test-root-")
        os.chmod(self.tmp_root, 0o711)

    def close(self):
        self.server.close()
        for path in self.targets:
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(self.shared_dir)
        shutil.rmtree(self.tmp_root)


UNITTEST_ADD = """
import unittest
class T(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(1, 2), 3)
unittest.main()
"""


def python_cases(host):
    daemon = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{MARKER}"], start_new_session=True)
    """)
    writes = "\n".join(f"try:\n    open({t!r}, 'w').write('x')\nexcept OSError:\n    pass" for t in host.targets)
    return {
        "py_correct": ("pass", sample("python", "def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n")),
        "py_wrong": ("fail", sample("python", "def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3\n")),
        "py_syntax": ("compile_error", sample("python", "def add(a, b)\n    return a + b\n", "assert add(1, 2) == 3")),
        "py_raises": ("runtime_error", sample("python", "def add(a, b):\n    raise ValueError('no')\n",
                                              "assert add(1, 2) == 3\n")),
        "py_humaneval_wrong": ("fail", sample("python", "def add(a, b):\n    return a - b\n",
                                              "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                                              entry_point="add")),
        "py_humaneval_right": ("pass", sample("python", "def add(a, b):\n    return a + b\n",
                                              "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                                              entry_point="add")),
        "py_pytest_style": ("fail", sample("python", "def add(a, b):\n    return a - b\n",
                                           "def test_add():\n    assert add(1, 2) == 3\n")),
        "py_unittest": ("fail", sample("python", "def add(a, b):\n    return a - b\n", """
            import unittest
            class T(unittest.TestCase):
                def test_add(self):
                    self.assertEqual(add(1, 2), 3)
            unittest.main()
        """)),
        "py_loop": ("timeout", sample("python", "while True:\n    pass\n")),
        "py_sleep_forever": ("timeout", sample("python", "import time\nwhile True:\n    time.sleep(1)\n")),
        # bytes(n) maps zeroed pages without touching them: the limit bites at once, however busy the machine.
        "py_memory": ("runtime_error", sample("python",
                                              "chunks = []\nwhile True:\n    chunks.append(bytes(1 << 24))\n")),
        "py_fork_bomb": ("timeout", sample("python", daemon + textwrap.dedent("""
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """))),
        "py_daemon": ("pass", sample("python", daemon)),
        "py_writes_outside": ("pass", sample("python", writes)),
        "py_network": ("runtime_error", sample("python", f"""
            import socket
            socket.create_connection(("127.0.0.1", {host.port}), timeout=1).close()
        """)),
        "py_output_flood": ("runtime_error", sample("python", "while True:\n    print('x' * 1000)\n")),
        "py_io_pass": ("pass", io_sample("python", "a, b = map(int, input().split())\nprint(a + b)\n",
                                         [("1 2\n", "3\n"), ("10   20", "  30  \r\n\n")])),
        "py_io_wrong": ("fail", io_sample("python", "a, b = map(int, input().split())\nprint(a * b)\n",
                                          [("2 2\n", "4\n"), ("1 2\n", "3\n")])),
        "py_io_crash": ("runtime_error", io_sample("python", "print(1 // int(input()))\n", [("0\n", "0\n")])),
        # Exit 0 before the tests ran is no pass: the tests below would fail had they run.
        "py_exits_in_main": ("fail", sample("python", """
            import sys
            def add(a, b):
                return a - b
            def main():
                print(add(2, 2))
            if __name__ == "__main__":
                sys.exit(main())
        """, "assert add(1, 2) == 3\n")),
        "py_os_exit": ("fail", sample("python", "import os\ndef add(a, b):\n    return a - b\nos._exit(0)\n",
                                      "assert add(1, 2) == 3\n")),
        "py_exit_before_unittest": ("fail", sample("python", "import sys\ndef add(a, b):\n    return a - b\n"
                                                             "sys.exit(0)\n", UNITTEST_ADD)),
        "py_unittest_pass": ("pass", sample("python", "def add(a, b):\n    return a + b\n", UNITTEST_ADD)),
        # A marker that is not a regular file proves nothing, and must not block the sandbox reading it.
        "py_marker_fifo": ("fail", sample("python", "import os\nos.mkfifo(os.environ['MCODE_SANDBOX_COMPLETION_FILE'])"
                                                    "\nos._exit(0)\n")),
        # stdin/stdout programs may exit early: their output decides.
        "py_io_exits": ("pass", io_sample("python", "import sys\nprint(int(input()) * 2)\nsys.exit(0)\nprint(0)\n",
                                          [("2\n", "4\n")])),
    }


def c_cases(host):
    daemon = f"""
        #include <unistd.h>
        static void daemonize(void) {{
            if (fork() == 0) {{
                setsid(); execl("/bin/sh", "sh", "-c", "sleep 300; :", "{MARKER}", (char *)0); _exit(1);
            }}
        }}
    """
    writes = "".join(f'    {{ FILE *f = fopen("{t}", "w"); if (f) {{ fputs("x", f); fclose(f); }} }}\n'
                     for t in host.targets)
    add = "int add(int a, int b) { return a + b; }\n"
    check = "#include <assert.h>\nint main(void) { assert(add(1, 2) == 3); return 0; }\n"
    return {
        "c_correct": ("pass", sample("c", add, check)),
        "c_wrong": ("fail", sample("c", "int add(int a, int b) { return a - b; }\n", check)),
        "c_compile_error": ("compile_error", sample("c", "int add(int a, int b) { return a + c; }\n", check)),
        "c_loop": ("timeout", sample("c", "int main(void) { volatile int x = 0; for (;;) x++; }\n")),
        "c_memory": ("runtime_error", sample("c", """
            #include <stdlib.h>
            #include <string.h>
            int main(void) { for (;;) { char *p = malloc(1 << 24); memset(p, 1, 1 << 24); } }
        """)),
        "c_fork_bomb": ("timeout", sample("c", daemon + "int main(void) { daemonize(); for (;;) fork(); }\n")),
        "c_daemon": ("pass", sample("c", daemon + "int main(void) { daemonize(); return 0; }\n")),
        "c_writes_outside": ("pass", sample("c", "#include <stdio.h>\nint main(void) {\n" + writes
                                                 + "    return 0;\n}\n")),
        "c_network": ("runtime_error", sample("c", f"""
            #include <arpa/inet.h>
            #include <sys/socket.h>
            int main(void) {{
                int s = socket(AF_INET, SOCK_STREAM, 0);
                struct sockaddr_in a = {{0}};
                a.sin_family = AF_INET; a.sin_port = htons({host.port}); a.sin_addr.s_addr = htonl(0x7f000001);
                return connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : 3;
            }}
        """)),
        "c_io_pass": ("pass", io_sample("c", "#include <stdio.h>\nint main(void) { int a, b; scanf(\"%d %d\", &a, &b);"
                                             " printf(\"%d\\n\", a + b); return 0; }\n",
                                        [("1 2", "3"), ("5 6\n", "11\n")])),
        "cpp_correct": ("pass", sample("cpp", "#include <vector>\nint total(std::vector<int> v) "
                                              "{ int s = 0; for (int x : v) s += x; return s; }\n",
                                       "#include <cassert>\nint main() { assert(total({1, 2}) == 3); }\n")),
        "cpp_wrong": ("fail", sample("cpp", "int add(int a, int b) { return a - b; }\n",
                                     "#include <cassert>\nint main() { assert(add(1, 2) == 3); }\n")),
        "cpp_compile_error": ("compile_error", sample("cpp", "int main() { std::cout << 1; }\n")),
        "cpp_uncaught_exception": ("runtime_error", sample("cpp", "#include <stdexcept>\nint main() "
                                                                  "{ throw std::runtime_error(\"boom\"); }\n")),
        "c_exit_early": ("fail", sample("c", "#include <stdlib.h>\nint add(int a, int b) { exit(0); }\n", check)),
        "c_io_exits": ("pass", io_sample("c", "#include <stdio.h>\n#include <stdlib.h>\nint main(void) "
                                              "{ puts(\"ok\"); exit(0); }\n", [("", "ok\n")])),
        "cpp_exit_early": ("fail", sample("cpp", "#include <cstdlib>\nint add(int a, int b) { std::exit(0); }\n",
                                          "#include <cassert>\nint main() { assert(add(1, 2) == 3); }\n")),
    }


def javascript_cases(host):
    writes = "".join(f"try {{ fs.writeFileSync({json.dumps(t)}, 'x'); }} catch (e) {{}}\n" for t in host.targets)
    return {
        "js_correct": ("pass", sample("javascript", "function add(a, b) { return a + b; }\n",
                                      "const assert = require('assert');\nassert.strictEqual(add(1, 2), 3);\n")),
        "js_wrong": ("fail", sample("javascript", "function add(a, b) { return a - b; }\n",
                                    "const assert = require('assert');\nassert.strictEqual(add(1, 2), 3);\n")),
        "js_console_assert": ("fail", sample("javascript", "function add(a, b) { return a - b; }\n",
                                             "console.assert(add(1, 2) === 3, 'add');\n")),
        "js_esm_correct": ("pass", sample("javascript", "export function add(a, b) { return a + b; }\n",
                                          "import assert from 'assert';\nassert.strictEqual(add(1, 2), 3);\n")),
        "js_syntax": ("compile_error", sample("javascript", "function add(a, b) { return a + ; }\n")),
        "js_type_error": ("runtime_error", sample("javascript", "null.x;\n")),
        "js_loop": ("timeout", sample("javascript", "for (;;) {}\n")),
        "js_memory": ("runtime_error", sample("javascript",
                                              "const a = []; for (;;) a.push(new ArrayBuffer(1 << 24));\n")),
        "js_writes_outside": ("pass", sample("javascript", "const fs = require('fs');\n" + writes)),
        "js_network": ("runtime_error", sample("javascript", f"""
            const net = require('net');
            const s = net.connect({host.port}, '127.0.0.1', () => {{ s.end(); }});
            s.on('error', (e) => {{ throw e; }});
        """)),
        "js_io_pass": ("pass", io_sample("javascript", "const [a, b] = require('fs').readFileSync(0, 'utf8')"
                                                      ".trim().split(/\\s+/).map(Number);\nconsole.log(a + b);\n",
                                         [("1 2\n", "3\n")])),
        "js_exit_early": ("fail", sample("javascript", "function add(a, b) { return a - b; }\nprocess.exit(0);\n",
                                         "const assert = require('assert');\nassert.strictEqual(add(1, 2), 3);\n")),
        "js_esm_exit_early": ("fail", sample("javascript", "export function add(a, b) { return a - b; }\n"
                                                           "process.exit(0);\n",
                                             "import assert from 'assert';\nassert.strictEqual(add(1, 2), 3);\n")),
    }


def other_cases(host):
    main_class = "public class Main {{ public static void main(String[] args) {{ {} }} }}\n"
    bash_check = "[ \"$(add 1 2)\" = 3 ] || exit 1\n"
    return {
        "java_correct": ("pass", sample("java", "class Solution { static int add(int a, int b) { return a + b; } }\n",
                                        main_class.format("assert Solution.add(1, 2) == 3;"))),
        "java_wrong": ("fail", sample("java", "class Solution { static int add(int a, int b) { return a - b; } }\n",
                                      main_class.format("assert Solution.add(1, 2) == 3 : \"add\";"))),
        "java_compile_error": ("compile_error", sample("java", main_class.format("int x = ;"))),
        "java_exception": ("runtime_error", sample("java", main_class.format("Object o = null; o.hashCode();"))),
        "rust_correct": ("pass", sample("rust", "fn add(a: i32, b: i32) -> i32 { a + b }\n",
                                        "fn main() { assert_eq!(add(1, 2), 3); }\n")),
        "rust_wrong": ("fail", sample("rust", "fn add(a: i32, b: i32) -> i32 { a - b }\n",
                                      "fn main() { assert!(add(1, 2) == 3, \"add gave {}\", add(1, 2)); }\n")),
        "rust_test_attribute": ("fail", sample("rust", "fn add(a: i32, b: i32) -> i32 { a - b }\n",
                                               "#[test]\nfn adds() { assert_eq!(add(1, 2), 3); }\n")),
        "rust_panic": ("runtime_error", sample("rust", "fn main() { let v: Vec<i32> = Vec::new(); "
                                                       "println!(\"{}\", v[3]); }\n")),
        "rust_compile_error": ("compile_error", sample("rust", "fn main() { let x: i32 = \"s\"; }\n")),
        "bash_correct": ("pass", sample("bash", "add() { echo $(($1 + $2)); }\n", bash_check)),
        "bash_wrong": ("fail", sample("bash", "add() { echo $(($1 - $2)); }\n", bash_check)),
        "bash_syntax": ("compile_error", sample("bash", "if then fi ((\n")),
        "bash_loop": ("timeout", sample("bash", "while :; do :; done\n")),
        "bash_fork_bomb": ("timeout", sample("bash", "b() { b | b & }; b\nwhile :; do b; sleep 0.1; done\n")),
        "bash_network": ("fail", sample("bash", f"exec 3<>/dev/tcp/127.0.0.1/{host.port} || exit 1\n")),
        "bash_exit_early": ("fail", sample("bash", "add() { echo $(($1 - $2)); }\nmain() { add 2 2; exit 0; }\n"
                                                   "main \"$@\"\n", bash_check)),
        "bash_last_status_kept": ("fail", sample("bash", "add() { echo $(($1 - $2)); }\n",
                                                 "[ \"$(add 1 2)\" = 3 ]\n")),
        "java_exit_early": ("fail", sample("java", "class Solution { static int add(int a, int b) "
                                                   "{ System.exit(0); return a - b; } }\n",
                                           main_class.format("assert Solution.add(1, 2) == 3;"))),
        "rust_exit_early": ("fail", sample("rust", "fn add(a: i32, b: i32) -> i32 { std::process::exit(0) }\n",
                                           "fn main() { assert_eq!(add(1, 2), 3); }\n")),
        "rust_test_attribute_pass": ("pass", sample("rust", "fn add(a: i32, b: i32) -> i32 { a + b }\n",
                                                    "#[test]\nfn adds() { assert_eq!(add(1, 2), 3); }\n")),
        "go_program": ("pass" if TOOLCHAINS["go"] else "sandbox_error",
                       sample("go", "package main\n\nfunc main() {}\n")),
    }


CASE_BUILDERS = (python_cases, c_cases, javascript_cases, other_cases)
LANGUAGE_OF_PREFIX = {"py": "python", "c": "c", "cpp": "cpp", "js": "javascript", "java": "java", "rust": "rust",
                      "bash": "bash", "go": "go"}
class _NoHost:
    """Stands in for :class:`Host` when only the case names are needed (to parametrize at import)."""
    port, targets = 0, []


ALL_CASE_NAMES = [name for build in CASE_BUILDERS for name in build(_NoHost())]
# Generous enough for a loaded 2-core machine; every timeout case costs this much (they run two at a time).
CONFIG = dict(timeout_s=4.0, cpu_s=4.0, memory_mb=256, max_processes=32, max_file_mb=8, max_output_bytes=1 << 16,
              workers=2, compile_timeout_s=60.0, progress=False)


def sandbox_processes() -> list[str]:
    """Live processes that carry the marker or run under a sandbox uid, as 'pid cmdline' strings."""
    found = []
    first, count = SandboxConfig().first_uid, SandboxConfig().uid_count
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        if MARKER in cmdline or first <= uid < first + count:
            found.append(f"{entry} {cmdline}")
    return found


@pytest.fixture(scope="module")
def host():
    h = Host()
    yield h
    h.close()


@pytest.fixture(scope="module")
def batch(host):
    cases = {name: case for build in CASE_BUILDERS for name, case in build(host).items()}
    runnable = {name: case for name, case in cases.items()
                if TOOLCHAINS[case[1]["language"]] is not None or case[1]["language"] == "go"}
    config = SandboxConfig(tmp_root=host.tmp_root, **CONFIG)
    started = time.monotonic()
    results = validate_samples([case[1] for case in runnable.values()], config)
    elapsed = time.monotonic() - started
    return {name: (case[0], result) for (name, case), result in zip(runnable.items(), results)}, elapsed


@pytest.mark.parametrize("name", ALL_CASE_NAMES)
def test_verdict(batch, name):
    outcomes, _ = batch
    if name not in outcomes:
        pytest.skip(f"toolchain for {name} not installed")
    expected, result = outcomes[name]
    assert isinstance(result, ExecutionResult)
    detail = f"{name}: {result.verdict} ({result.message}); stderr: {result.stderr_excerpt[-600:]}"
    assert result.verdict == expected, detail


def test_results_explain_themselves(batch):
    outcomes, _ = batch
    by_name = {name: result for name, (_, result) in outcomes.items()}
    assert "AssertionError" in by_name["py_wrong"].stderr_excerpt
    assert "Assertion `add(1, 2) == 3' failed" in by_name["c_wrong"].stderr_excerpt
    assert "error" in by_name["c_compile_error"].stderr_excerpt and by_name["c_compile_error"].phase == "build"
    assert "wall-clock limit" in by_name["py_sleep_forever"].message
    assert "out of memory" in by_name["py_memory"].message
    assert "output limit" in by_name["py_output_flood"].message or "SIGXFSZ" in by_name["py_output_flood"].message
    assert by_name["py_io_wrong"].message.startswith("example 2 of 2: stdout differs")
    assert by_name["py_io_pass"].message == "all 2 examples matched"
    assert by_name["py_correct"].wall_s > 0 and by_name["py_correct"].cpu_s > 0
    for name in ("py_exits_in_main", "py_os_exit", "py_marker_fifo", "c_exit_early", "js_exit_early",
                 "bash_exit_early", "java_exit_early", "rust_exit_early"):
        if name in by_name:
            result = by_name[name]
            assert result.returncode == 0 and result.message == NOT_COMPLETED_MESSAGE, (name, result)
    if "go_program" in by_name and TOOLCHAINS["go"] is None:
        message = by_name["go_program"].message
        assert "no go toolchain" in message and "apt-get install golang-go" in message


def test_go_main_is_wrapped_by_the_completion_step():
    """Go is not installed on every machine: check the source transformation its recipe builds."""
    solution = "package main\n\nfunc add(a, b int) int { return a + b }\n"
    tests = "package main\n\nimport \"os\"\n\nfunc main() {\n\tif add(1, 2) != 3 {\n\t\tos.Exit(1)\n\t}\n}\n"
    files = go_files(solution, tests)
    assert files["solution.go"] == solution
    assert files["tests.go"] == tests.replace("func main()", f"func {GO_RENAMED_MAIN}()")
    wrapper = files["sandbox_completion.go"]  # reads the marker path, runs the tests, then creates the marker
    steps = (f'os.Getenv("{COMPLETION_ENV}")', f"\t{GO_RENAMED_MAIN}()\n", "os.Create(marker)")
    assert "\nfunc main() {" in wrapper and [wrapper.index(step) for step in steps] == sorted(
        wrapper.index(step) for step in steps)
    program = "package main\n\nfunc main() {}\n"  # no tests: the solution's own main is the program
    assert go_files(program, "")["solution.go"] == f"package main\n\nfunc {GO_RENAMED_MAIN}() {{}}\n"
    assert "sandbox_completion.go" not in go_files(solution, "")  # no main at all: go build reports it


def test_network_is_unreachable(batch, host):
    outcomes, _ = batch
    if not plan_isolation(SandboxConfig()).network_isolated:
        pytest.skip("no network namespace here: " + plan_isolation(SandboxConfig()).description)
    for name in ("py_network", "c_network", "js_network", "bash_network"):
        if name in outcomes:
            assert outcomes[name][1].verdict != "pass", name
    with pytest.raises(BlockingIOError):
        host.server.accept()  # nobody connected


def test_host_untouched(batch, host):
    outcomes, _ = batch
    if not plan_isolation(SandboxConfig()).covers:
        pytest.skip("no private mount namespace here")
    for path in host.targets:
        assert not os.path.exists(path), f"a sandboxed program wrote {path}"
    assert os.listdir(host.tmp_root) == [], "work directories were left behind"
    deadline = time.monotonic() + 3
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes after the fork bombs


def test_isolation_is_reported(batch):
    outcomes, _ = batch
    result = outcomes["py_correct"][1]
    assert result.isolation == plan_isolation(SandboxConfig(**CONFIG)).description
    if IS_ROOT and plan_isolation(SandboxConfig()).namespaces:
        assert "net" in result.isolation and "leased unprivileged uid" in result.isolation


def test_batch_keeps_input_order():
    config = SandboxConfig(workers=2, progress=False)
    slow = sample("python", "import time\ntime.sleep(1.0)\nprint('slow')\n")
    fast = sample("python", "print('fast')\n")
    results = validate_samples([slow, fast, fast], config)
    assert [r.stdout_excerpt for r in results] == ["slow\n", "fast\n", "fast\n"]


def test_work_dirs_of_dead_processes_are_swept():
    root = tempfile.mkdtemp(prefix="sandbox-test-sweep-")
    os.chmod(root, 0o711)
    try:
        finished = subprocess.Popen(["true"])
        finished.wait()
        orphan = os.path.join(root, f"mcode-sandbox-{finished.pid}-abc")  # its creator died mid-run
        live = os.path.join(root, f"mcode-sandbox-{os.getpid()}-abc")  # a concurrent run of a live process
        for path in (orphan, live):
            os.makedirs(os.path.join(path, "work"))
        assert run_program("python", "print(1)\n", config=SandboxConfig(tmp_root=root)).verdict == "pass"
        assert sorted(os.listdir(root)) == [os.path.basename(live)]
    finally:
        shutil.rmtree(root)


def test_cpu_limit_is_a_timeout():
    result = run_program("python", "while True:\n    pass\n", config=SandboxConfig(timeout_s=10, cpu_s=1))
    assert result.verdict == "timeout" and "CPU limit" in result.message, result
    assert result.cpu_s >= 0.9


def test_without_namespaces_leftovers_are_still_killed():
    if not IS_ROOT or TOOLCHAINS["c"] is None:
        pytest.skip("needs root (kill by leased uid) and a C compiler")
    config = SandboxConfig(namespaces=False, progress=False)
    daemon = (f'#include <unistd.h>\nint main(void) {{ if (fork() == 0) {{ setsid(); execl("/bin/sh", "sh", "-c", '
              f'"sleep 300; :", "{MARKER}-nons", (char *)0); }} return 0; }}\n')
    result = run_program("c", daemon, config=config)
    assert result.verdict == "pass", result
    assert "NO namespaces" in result.isolation and "network NOT isolated" in result.isolation
    assert not [p for p in sandbox_processes() if f"{MARKER}-nons" in p]
    # A toolchain the leased uid cannot reach (pyenv under /root, mode 700) is refused, not run as root.
    python = run_program("python", "print(1)\n", config=config)
    if unreachable_reason(TOOLCHAINS["python"].install_roots, plan_isolation(config)):
        assert python.verdict == "sandbox_error" and "not reachable by the sandbox uid" in python.message
    else:
        assert python.verdict == "pass", python


def run_as_nobody(driver: str, home) -> dict:
    """Run ``driver`` (Python that prints an ExecutionResult as JSON last) as uid 65534 with the system python.

    The package is copied to a world-readable directory first: the checkout may sit under a
    directory that uid 65534 cannot enter (CI clones into a mode-700 mktemp directory)."""
    readable = tempfile.mkdtemp(prefix="sandbox-nobody-")
    try:
        os.chmod(readable, 0o755)
        shutil.copytree(os.path.join(REPO, "data_tools"), os.path.join(readable, "data_tools"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-c", driver], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": readable})
    finally:
        shutil.rmtree(readable)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def nobody_home(tmp_path):
    if not IS_ROOT or not os.path.exists("/usr/bin/python3") or shutil.which("setpriv") is None:
        pytest.skip("needs root to start a process as another user, /usr/bin/python3 and setpriv")
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    return home


def test_non_root_uses_a_user_namespace(nobody_home, host):
    """As an unprivileged user the program runs in a user namespace with no capabilities."""
    program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {host.port}), timeout=1)\n"
               f"    print('connected')\nexcept OSError:\n    print('no network')\n"
               f"try:\n    open('{nobody_home}/escaped', 'w').write('x')\nexcept OSError:\n    pass\n"
               "print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1])\n")
    result = run_as_nobody("import json\nfrom data_tools.sandbox import run_program\n"
                           f"print(json.dumps(run_program('python', {program!r}).to_dict()))\n", nobody_home)
    if "NO namespaces" in result["isolation"]:
        pytest.skip("unprivileged user namespaces are not allowed here: " + result["isolation"])
    assert result["verdict"] == "pass", result
    assert result["stdout_excerpt"].split() == ["no", "network", "0000000000000000"]
    assert "user (no capabilities)" in result["isolation"]
    assert not (nobody_home / "escaped").exists()


def test_non_root_without_namespaces_still_kills_leftovers(nobody_home):
    """The weakest mode (no namespaces, no uid switch) says so, and still leaves no process behind."""
    program = (f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', "
               f"'{MARKER}-nobody'], start_new_session=True)\n")
    result = run_as_nobody("import json\nfrom data_tools.sandbox import run_program, SandboxConfig\n"
                           f"r = run_program('python', {program!r}, config=SandboxConfig(namespaces=False))\n"
                           "print(json.dumps(r.to_dict()))\n", nobody_home)
    assert result["verdict"] == "pass", result
    assert "NO namespaces" in result["isolation"] and "caller's uid" in result["isolation"]
    assert not [p for p in sandbox_processes() if f"{MARKER}-nobody" in p]


def test_bad_config_and_samples_fail_early():
    with pytest.raises(DataToolError, match="timeout_s: expected a positive number"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(DataToolError, match="'language' must be one of"):
        validate_sample({"language": "cobol", "solution": "x"})
    with pytest.raises(DataToolError, match=r"samples\[1\]: test_format 'stdin_stdout' needs"):
        validate_samples([sample("python", "print(1)"), sample("python", "print(1)", test_format="stdin_stdout")])


def test_cli(tmp_path, capsys):
    samples = [sample("python", "def f():\n    return 1\n", "assert f() == 1\n"),
               sample("python", "def f():\n    return 2\n", "assert f() == 1\n"),
               sample("go", "package main\n\nfunc main() {}\n")]
    source = tmp_path / "samples.jsonl"
    source.write_text("".join(json.dumps(s) + "\n" for s in samples))
    output = tmp_path / "validated.jsonl"
    main(["--input", str(source), "--output", str(output), "--workers", "2", "--timeout-s", "5", "--no-progress"])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == [s["id"] for s in samples]
    assert [line["execution"]["verdict"] for line in lines][:2] == ["pass", "fail"]
    out, err = capsys.readouterr()
    assert "language" in out and "python" in out.splitlines()[2] and "total" in out
    if TOOLCHAINS["go"] is None:
        assert "WARNING: 1 go sample(s) will get verdict sandbox_error" in err
    kept = tmp_path / "passed.jsonl"
    main(["--input", str(source), "--output", str(kept), "--keep", "passed", "--no-progress"])
    assert [json.loads(line)["id"] for line in kept.read_text().splitlines()] == [samples[0]["id"]]
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        main(["--input", str(source), "--output", str(kept), "--no-progress"])


def test_cli_rejects_bad_input_before_running(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(sample("python", "print(1)")) + "\n" + json.dumps({"solution": "x"}) + "\n")
    output = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: field 'language' must be one of"):
        main(["--input", str(source), "--output", str(output)])
    assert not output.exists()


def test_list_toolchains(capsys):
    main(["--list-toolchains"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("python") and "isolation:" in out
    for language, toolchain in TOOLCHAINS.items():
        line = next(line for line in out.splitlines() if line.startswith(language + " "))
        assert ("ok" in line) == (toolchain is not None) and ("MISSING" in line) == (toolchain is None)
