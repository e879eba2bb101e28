"""LiveCodeBench/Codeforces-shaped problems: a program reads stdin and writes stdout, judged on
input/output examples rather than on test code."""
from __future__ import annotations

import json

from data_tools.generate.reply_sections import check_python, code_block, difficulty_of, require_sections
from data_tools.generate.strategies.base import SeededStrategy
from data_tools.generate.work import WorkItem
from data_tools.teacher.errors import ReplyRejected

SECTIONS = ("Problem", "Solution", "Examples", "Difficulty")


def parse_io_examples(body: str) -> list[dict]:
    """A JSON list of ``{"input": str, "output": str}`` objects (at least one)."""
    try:
        examples = json.loads(code_block(body, "examples"))
    except json.JSONDecodeError as exc:
        raise ReplyRejected(f"examples are not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(examples, list) or not examples:
        raise ReplyRejected("examples must be a non-empty JSON list")
    for i, example in enumerate(examples):
        if not (isinstance(example, dict) and isinstance(example.get("input"), str)
                and isinstance(example.get("output"), str) and example["output"].strip()):
            raise ReplyRejected(f"example {i} must be an object with string 'input' and non-empty string 'output'")
    return [{"input": e["input"], "output": e["output"]} for e in examples]


def parse_livecodebench_reply(text: str, language: str) -> dict:
    sections = require_sections(text, SECTIONS, ("Problem", "Solution", "Examples"), inline=("Difficulty",))
    solution = code_block(sections["Solution"], "solution")
    if language == "python":
        check_python(solution, "solution")
    return {"problem": sections["Problem"].strip(), "solution": solution, "tests": "", "test_format": "stdin_stdout",
            "io_examples": parse_io_examples(sections["Examples"]),
            "difficulty": difficulty_of(sections.get("Difficulty"))}


class LiveCodeBenchStyle(SeededStrategy):
    name = "livecodebench_style"
    template = "livecodebench_style"

    def parse(self, text: str, item: WorkItem) -> dict:
        return parse_livecodebench_reply(text, item.language)
