"""Parser of the problem/solution/tests reply shared by OSS-Instruct and Evol-Instruct."""
from __future__ import annotations

from data_tools.generate.reply_sections import (check_python, code_block, concepts_of, difficulty_of, has_assertion,
                                                require_sections)
from data_tools.teacher.errors import ReplyRejected

SECTIONS = ("Problem", "Solution", "Tests", "Difficulty", "Concepts")
MIN_PROBLEM_CHARS = 20


def parse_problem_reply(text: str, language: str) -> dict:
    """``problem``, ``solution``, ``tests``, ``difficulty`` and ``concepts`` of a reply; else :class:`ReplyRejected`."""
    sections = require_sections(text, SECTIONS, ("Problem", "Solution", "Tests"), inline=("Difficulty", "Concepts"))
    problem = sections["Problem"].strip()
    if len(problem) < MIN_PROBLEM_CHARS:
        raise ReplyRejected(f"problem statement is too short ({len(problem)} characters)")
    solution = code_block(sections["Solution"], "solution")
    tests = code_block(sections["Tests"], "tests")
    check_script_tests(solution, tests, language)
    return {"problem": problem, "solution": solution, "tests": tests,
            "difficulty": difficulty_of(sections.get("Difficulty")), "concepts": concepts_of(sections.get("Concepts"))}


def check_script_tests(solution: str, tests: str, language: str) -> None:
    """Reject what cannot pass for sure, before paying for a sandbox run.

    Python is parsed (syntax errors, tests without any check); other languages are left to
    their compilers in the sandbox, whose verdict is as cheap as a check here would be.
    """
    if solution.strip() == tests.strip():
        raise ReplyRejected("tests repeat the solution instead of testing it")
    if language != "python":
        return
    check_python(solution, "solution")
    if not has_assertion(check_python(tests, "tests")):
        raise ReplyRejected("tests check nothing (no assert, raise or assert* call)")
