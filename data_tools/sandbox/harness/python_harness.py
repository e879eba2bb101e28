"""Runs main.py as ``__main__`` and tells a failed test from a crash by the exit status.

An uncaught AssertionError (``assert``, unittest's assert* methods) and a unittest.main() run whose
tests failed (without errors) exit with 117; a syntax error in main.py exits with 118; any other
uncaught exception with Python's own status 1. The sandbox
writes this file next to main.py and runs ``python -I _sandbox_harness.py main.py``.
"""
import sys
import traceback
import types

TEST_FAILED = 117
SYNTAX_ERROR = 118


def main(path: str) -> None:
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
        if exc.code not in (0, None) and only_unittest_failures(exc):
            sys.exit(TEST_FAILED)
        raise
    except Exception as exc:  # SystemExit and KeyboardInterrupt keep their own meaning
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without the harness's frame
        sys.exit(TEST_FAILED if isinstance(exc, AssertionError) else 1)


def only_unittest_failures(exc: SystemExit) -> bool:
    """True when unittest.main() exited because tests failed (not because one raised an error)."""
    unittest = sys.modules.get("unittest")
    frame_tb = exc.__traceback__
    while unittest is not None and frame_tb is not None:
        program = frame_tb.tb_frame.f_locals.get("self")  # unittest.main() exits from TestProgram.runTests
        if isinstance(program, unittest.TestProgram) and getattr(program, "result", None) is not None:
            return bool(program.result.failures) and not program.result.errors
        frame_tb = frame_tb.tb_next
    return False


if __name__ == "__main__":
    main(sys.argv[1])
