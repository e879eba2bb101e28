"""Self-generated unit tests: given a problem and its solution, the teacher writes the tests.

The new tests replace the source's and must pass against the source's solution in the
sandbox; a test that fails there is either wrong or found a bug, and either way the sample is
not kept (the failure is recorded, and the repair strategy can take it up).
"""
from __future__ import annotations

from data_tools.generate.context import GenerationContext
from data_tools.generate.reply_sections import code_block, require_sections
from data_tools.generate.strategies.base import SampleStrategy
from data_tools.generate.strategies.problem_reply import check_script_tests
from data_tools.generate.templates import chat_messages, conventions_for_tests
from data_tools.generate.work import WorkItem
from data_tools.records import fenced

CARRIED = ("problem", "solution", "entry_point", "difficulty", "concepts")


def parse_tests_reply(text: str, solution: str, language: str) -> str:
    tests = code_block(require_sections(text, ("Tests",), ("Tests",))["Tests"], "tests")
    check_script_tests(solution, tests, language)
    return tests


class UnitTests(SampleStrategy):
    name = "unit_tests"
    template = "unit_tests"

    def accepts(self, source: dict) -> bool:
        return bool(source.get("problem") and source.get("solution")) and source.get("test_format") != "stdin_stdout"

    async def run(self, item: WorkItem, ctx: GenerationContext) -> None:
        source = item.source
        assert source is not None
        messages = chat_messages(self.template, problem=source["problem"], language=item.language,
                                 solution_block=fenced(source["solution"], item.language), fence=item.language,
                                 test_conventions=conventions_for_tests(item.language))

        def parse(text: str) -> dict:
            tests = parse_tests_reply(text, source["solution"], item.language)
            return {**{k: source.get(k) for k in CARRIED}, "tests": tests, "test_format": "script"}

        await ctx.attempt(item, item.sample_id(), messages, parse, round_=int(source.get("evol_round") or 0),
                          parent_id=source["id"])
