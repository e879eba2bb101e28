"""OSS-Instruct (Magicoder, Wei et al. 2023): a window of real open-source code inspires a new problem,
which the teacher writes together with its solution and tests."""
from __future__ import annotations

from data_tools.generate.strategies.base import SeededStrategy
from data_tools.generate.strategies.problem_reply import parse_problem_reply
from data_tools.generate.work import WorkItem


class OssInstruct(SeededStrategy):
    name = "oss_instruct"
    template = "oss_instruct"

    def parse(self, text: str, item: WorkItem) -> dict:
        return parse_problem_reply(text, item.language)
