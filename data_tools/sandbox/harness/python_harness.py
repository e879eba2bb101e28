"""Runs main.py as ``__main__`` and tells a failed test from a crash by the exit status.

An uncaught AssertionError (``assert``, unittest's assert* methods) and a unittest.main() run whose
tests failed (without errors) exit with 117; a syntax error in main.py exits with 118; any other
uncaught exception with Python's own status 1. The sandbox
writes this file next to main.py and runs ``python -I _sandbox_harness.py main.py``.

When main.py runs to its end, or ends in a unittest.main() whose tests all passed, the harness creates
the completion marker named by $MCODE_SANDBOX_COMPLETION_FILE (data_tools/sandbox/completion.py): a
``sys.exit(0)`` or ``os._exit(0)`` before the tests leaves none, and the sandbox does not count it a pass.
"""
import os
import sys
import traceback
import types

TEST_FAILED = 117
SYNTAX_ERROR = 118
COMPLETION_ENV = "MCODE_SANDBOX_COMPLETION_FILE"


def main(path: str) -> None:
    marker = os.environ.get(COMPLETION_ENV)  # read first: the program may change its environment
    with open(path, "rb") as f:
        source = f.read()
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:  # ValueError: the source holds a NUL byte
        traceback.print_exception(type(exc), exc, None)
        sys.exit(SYNTAX_ERROR)
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module  # pickling and `if __name__ == "__main__"` see the program, not us
    sys.argv[:] = [path]
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        result = unittest_result(exc)
        if exc.code not in (0, None) and result is not None and result.failures and not result.errors:
            sys.exit(TEST_FAILED)
        if exc.code in (0, None) and result is not None and result.testsRun and result.wasSuccessful():
            mark_completed(marker)  # unittest.main() ends the program once its tests have run
        raise
    except Exception as exc:  # SystemExit and KeyboardInterrupt keep their own meaning
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without the harness's frame
        sys.exit(TEST_FAILED if isinstance(exc, AssertionError) else 1)
    mark_completed(marker)


def unittest_result(exc: SystemExit):
    """The TestResult when unittest.main() raised ``exc`` after running its tests, else None."""
    unittest = sys.modules.get("unittest")
    frame_tb = exc.__traceback__
    while unittest is not None and frame_tb is not None:
        program = frame_tb.tb_frame.f_locals.get("self")  # unittest.main() exits from TestProgram.runTests
        if isinstance(program, unittest.TestProgram) and getattr(program, "result", None) is not None:
            return program.result
        frame_tb = frame_tb.tb_next
    return None


def mark_completed(marker) -> None:
    if marker:
        try:
            open(marker, "w").close()
        except OSError:
            pass  # no marker, no pass: the sandbox then reports that the tests did not finish


if __name__ == "__main__":
    main(sys.argv[1])
