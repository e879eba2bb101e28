"""HumanEval-shaped problems: a Python signature with a docstring to complete, a ``check(candidate)``
test function and an entry point, so synthetic data matches the benchmark's format."""
from __future__ import annotations

import ast
import re

from data_tools.generate.reply_sections import (check_python, code_block, defines_function, has_assertion,
                                                require_sections)
from data_tools.generate.strategies.base import SeededStrategy
from data_tools.generate.work import WorkItem
from data_tools.teacher.errors import ReplyRejected

SECTIONS = ("Prompt", "Solution", "Tests", "Entry Point")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def parse_humaneval_reply(text: str) -> dict:
    """``problem`` (the prompt), ``solution``, ``tests`` (ending in ``check(<entry_point>)``), ``entry_point``."""
    sections = require_sections(text, SECTIONS, SECTIONS, inline=("Entry Point",))
    entry = IDENTIFIER.search(sections["Entry Point"])
    if entry is None:
        raise ReplyRejected(f"entry point {sections['Entry Point'][:40]!r} is not a function name")
    entry_point = entry.group(0)
    prompt = code_block(sections["Prompt"], "prompt")
    solution = code_block(sections["Solution"], "solution")
    tests = code_block(sections["Tests"], "tests")
    function = next((node for node in check_python(prompt, "prompt").body
                     if isinstance(node, ast.FunctionDef) and node.name == entry_point), None)
    if function is None or ast.get_docstring(function) is None:
        raise ReplyRejected(f"prompt must define {entry_point}() with a docstring")
    if not defines_function(check_python(solution, "solution"), entry_point):
        raise ReplyRejected(f"solution does not define the entry point {entry_point}()")
    test_tree = check_python(tests, "tests")
    if not defines_function(test_tree, "check") or not has_assertion(test_tree):
        raise ReplyRejected("tests must define check(candidate) with assertions")
    if not re.search(rf"^check\(\s*{entry_point}\s*\)", tests, re.MULTILINE):
        tests = tests.rstrip("\n") + f"\n\n\ncheck({entry_point})\n"
    return {"problem": prompt, "solution": solution, "tests": tests, "entry_point": entry_point}


class HumanEvalStyle(SeededStrategy):
    name = "humaneval_style"
    template = "humaneval_style"

    def parse(self, text: str, item: WorkItem) -> dict:
        return parse_humaneval_reply(text)
