"""What a strategy uses while it runs: the teachers, the validator, the journal, the counters."""
from __future__ import annotations

import collections
from typing import Callable

from data_tools.generate.config import GenerationConfig
from data_tools.generate.journal import ACCEPTED, REJECTED, SampleJournal
from data_tools.generate.validation import BatchValidator
from data_tools.generate.work import WorkItem
from data_tools.teacher.client import TeacherAnswer, TeacherClient
from data_tools.teacher.errors import ReplyRejected

# Fields of a problem sample that a strategy does not always set (docs: the sample schema).
PROBLEM_DEFAULTS = {"problem": "", "solution": "", "tests": "", "test_format": "script", "io_examples": [],
                    "entry_point": None, "difficulty": None, "concepts": []}


def new_sample(item: WorkItem, sample_id: str, fields: dict, meta: dict, round_: int = 0,
               parent_id: str | None = None) -> dict:
    """A sample in the shared schema: common fields from the item, the rest from the parser."""
    sample = {"id": sample_id, "strategy": item.strategy, "teacher": item.teacher, "language": item.language,
              "seed_id": item.seed_id}
    if "text" not in fields:  # textbook documents carry text instead of problem/solution/tests
        sample.update(PROBLEM_DEFAULTS)
        sample.update(evol_round=round_, parent_id=parent_id)
    sample.update(fields)
    sample["teacher_meta"] = meta
    return sample


def passed(execution: dict | None) -> bool:
    return execution is None or execution.get("verdict") == "pass"


class GenerationContext:
    """Shared services of one run; strategies call :meth:`attempt` or the finer-grained methods."""

    def __init__(self, config: GenerationConfig, clients: dict[str, TeacherClient], journal: SampleJournal,
                 validator: BatchValidator | None):
        self.config = config
        self.clients = clients
        self.journal = journal
        self.validator = validator
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    async def ask(self, item: WorkItem, messages: list[dict], parse: Callable[[str], dict], key: str) -> TeacherAnswer:
        return await self.clients[item.teacher].ask(messages, parse, key)

    async def execute(self, sample: dict) -> dict | None:
        """The sample's execution record, or None when the run does not validate."""
        if self.validator is None:
            return None
        return await self.validator.validate(sample)

    def accept(self, sample: dict) -> None:
        self.journal.append(ACCEPTED, sample)
        self.counts[sample["strategy"]]["accepted"] += 1

    def reject(self, record: dict, stage: str, reason: str) -> None:
        """Record a failed item so reruns skip it; ``stage`` is ``parse`` or ``validation``."""
        self.journal.append(REJECTED, {**record, "rejection": {"stage": stage, "reason": reason}})
        self.counts[record["strategy"]][f"rejected_{stage}"] += 1

    def already_done(self, item: WorkItem, sample_id: str) -> bool:
        if self.journal.status(sample_id) is None:
            return False
        self.counts[item.strategy]["done_before"] += 1
        return True

    async def attempt(self, item: WorkItem, sample_id: str, messages: list[dict], parse: Callable[[str], dict], *,
                      round_: int = 0, parent_id: str | None = None, validate: bool = True) -> dict | None:
        """Ask, parse, validate and record one sample; return it when accepted, else None.

        An id already in the journal is not asked again: its accepted record is returned (so
        an evolution chain resumes where a crashed run left it), a rejected one gives None.
        """
        if self.already_done(item, sample_id):
            return self.journal.get(sample_id) if self.journal.status(sample_id) == ACCEPTED else None
        try:
            answer = await self.ask(item, messages, parse, key=sample_id)
        except ReplyRejected as exc:
            stub = new_sample(item, sample_id, {}, meta={}, round_=round_, parent_id=parent_id)
            self.reject(stub, "parse", exc.reason)
            return None
        sample = new_sample(item, sample_id, answer.value, answer.meta, round_=round_, parent_id=parent_id)
        execution = await self.execute(sample) if validate else None
        if execution is not None:
            sample["execution"] = execution
        if not passed(execution):
            self.reject(sample, "validation", f"verdict {execution['verdict']}")
            return None
        self.accept(sample)
        return sample
