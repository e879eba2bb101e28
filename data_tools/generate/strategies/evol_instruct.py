"""Evol-Instruct for code (WizardCoder, Luo et al. 2023): rewrite a problem into a harder one, K times.

Each round picks one mutation (prompts/evol_mutations.md) with an RNG private to the item and
round, and the teacher writes the evolved problem with a new solution and tests. Every
evolution is validated; one that fails is recorded as rejected and ends its lineage (later
rounds would build on a problem nobody has solved), as WizardCoder's elimination step does.
"""
from __future__ import annotations

from data_tools.generate.context import GenerationContext
from data_tools.generate.strategies.base import SampleStrategy
from data_tools.generate.strategies.problem_reply import parse_problem_reply
from data_tools.generate.templates import chat_messages, conventions_for_tests, evol_mutations
from data_tools.generate.work import WorkItem, item_rng
from data_tools.records import fenced


class EvolInstruct(SampleStrategy):
    name = "evol_instruct"
    template = "evol_instruct"

    def accepts(self, source: dict) -> bool:
        # stdin/stdout problems have a different reply format; they are evolved by their own strategy's template.
        return bool(source.get("problem") and source.get("solution")) and source.get("test_format") != "stdin_stdout"

    def mutation(self, item: WorkItem, round_: int) -> str:
        choices = self.spec.mutations or list(evol_mutations())
        return item_rng(self.config.seed, f"mutation/{round_}", item.key).choice(choices)

    async def run(self, item: WorkItem, ctx: GenerationContext) -> None:
        assert item.source is not None
        current, first_round = item.source, int(item.source.get("evol_round") or 0)
        for round_ in range(1, self.spec.rounds + 1):
            mutation = self.mutation(item, round_)
            messages = chat_messages(
                self.template, mutation=evol_mutations()[mutation], problem=current["problem"],
                solution_block=fenced(current["solution"], item.language), language=item.language,
                fence=item.language, test_conventions=conventions_for_tests(item.language))

            def parse(text: str, mutation: str = mutation) -> dict:
                return {**parse_problem_reply(text, item.language), "evol_mutation": mutation}

            evolved = await ctx.attempt(item, item.sample_id(round_), messages, parse,
                                        round_=first_round + round_, parent_id=current["id"])
            if evolved is None:
                return
            current = evolved
