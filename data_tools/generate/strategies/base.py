"""Common shape of a generation strategy: a prompt template, a parser, and how one item runs."""
from __future__ import annotations

import abc
import functools
from typing import Iterator, Sequence

from data_tools.generate.config import GenerationConfig, StrategySpec
from data_tools.generate.context import GenerationContext
from data_tools.generate.seeds import snippet
from data_tools.generate.templates import chat_messages, conventions_for_tests
from data_tools.generate.work import WorkItem, item_rng, sample_items, seeded_items
from data_tools.records import fenced


class Strategy(abc.ABC):
    """A strategy turns work items into recorded samples. Subclasses set ``name`` and ``template``."""

    name = ""
    template = ""

    def __init__(self, spec: StrategySpec, config: GenerationConfig):
        self.spec = spec
        self.config = config

    @abc.abstractmethod
    def work_items(self, inputs: Sequence[dict]) -> Iterator[WorkItem]:
        """The items this strategy asks the teacher about, from seeds or earlier samples."""

    @abc.abstractmethod
    async def run(self, item: WorkItem, ctx: GenerationContext) -> None:
        """Ask, parse, validate and record one item (through ctx)."""


class SeededStrategy(Strategy):
    """One request per item, prompted with a window of a seed document; the reply is one sample."""

    validates = True  # run the sample's tests; textbook documents have none

    def work_items(self, inputs: Sequence[dict]) -> Iterator[WorkItem]:
        return seeded_items(self.spec, inputs, self.config)

    def template_values(self, item: WorkItem) -> dict:
        assert item.seed is not None
        window = snippet(item.seed, self.config.snippet_lines, item_rng(self.config.seed, "snippet", item.key))
        seed_language = item.seed.get("language") or "unknown language"
        return {"seed_language": seed_language, "seed_source": item.seed.get("source") or "an unnamed project",
                "seed_block": fenced(window, item.seed.get("language")), "language": item.language,
                "fence": item.language, "test_conventions": conventions_for_tests(item.language)}

    @abc.abstractmethod
    def parse(self, text: str, item: WorkItem) -> dict:
        """The sample in a teacher's reply; raises ReplyRejected with the reason when it is unusable."""

    async def run(self, item: WorkItem, ctx: GenerationContext) -> None:
        messages = chat_messages(self.template, **self.template_values(item))
        await ctx.attempt(item, item.sample_id(), messages, functools.partial(self.parse, item=item),
                          validate=self.validates)


class SampleStrategy(Strategy):
    """Starts from earlier samples (``spec.source``) rather than from seeds."""

    @abc.abstractmethod
    def accepts(self, source: dict) -> bool:
        """Whether a source sample is something this strategy can work on."""

    def work_items(self, inputs: Sequence[dict]) -> Iterator[WorkItem]:
        return sample_items(self.spec, [s for s in inputs if self.accepts(s)], self.config)


def checks_of(sample: dict) -> tuple[str, str]:
    """(label, fenced block) showing what a sample is checked against: its tests or its examples."""
    if sample.get("test_format") == "stdin_stdout":
        examples = "\n".join(f"input:\n{e['input']}\nexpected output:\n{e['output']}" for e in sample["io_examples"])
        return "Examples it must reproduce (standard input -> standard output):", fenced(examples, "text")
    return "Tests (appended to the solution and run):", fenced(sample["tests"], sample.get("language"))
