"""Repair loop: a sample that failed validation, plus what the sandbox saw, goes back to a teacher.

Each round shows the latest failing solution with its verdict and an excerpt of its error
output; the teacher returns a corrected solution, which is run against the same tests (the
tests are the specification and are never changed). Up to ``rounds`` rounds; the sample keeps
every attempt in ``repair_history``, whether it ends fixed (accepted) or not (rejected).
Intermediate rounds are not journaled: after a crash the item restarts at round 1, and the
reply cache replays the rounds already paid for.
"""
from __future__ import annotations

from data_tools.generate.context import GenerationContext, new_sample, passed
from data_tools.generate.reply_sections import check_python, code_block, require_sections
from data_tools.generate.strategies.base import SampleStrategy, checks_of
from data_tools.generate.templates import chat_messages
from data_tools.generate.work import WorkItem
from data_tools.records import fenced
from data_tools.teacher.errors import ReplyRejected

CARRIED = ("problem", "tests", "test_format", "io_examples", "entry_point", "difficulty", "concepts")
STDERR_CHARS = 2000  # the end of the error output: where a traceback names the failing line


def parse_repair_reply(text: str, language: str) -> dict:
    solution = code_block(require_sections(text, ("Solution", "Explanation"), ("Solution",))["Solution"], "solution")
    if language == "python":
        check_python(solution, "solution")
    return {"solution": solution}


def history_entry(round_: int, solution: str | None, execution: dict) -> dict:
    return {"round": round_, "solution": solution, "verdict": execution.get("verdict"),
            "stderr_excerpt": (execution.get("stderr_excerpt") or "")[-STDERR_CHARS:]}


class Repair(SampleStrategy):
    name = "repair"
    template = "repair"

    def accepts(self, source: dict) -> bool:
        verdict = (source.get("execution") or {}).get("verdict")
        # sandbox_error is the machine's failure, not the sample's: nothing for a teacher to fix.
        return bool(source.get("solution")) and verdict not in (None, "pass", "sandbox_error")

    def messages(self, item: WorkItem, solution: str, execution: dict, round_: int) -> list[dict]:
        label, checks = checks_of(item.source)
        stderr = (execution.get("stderr_excerpt") or "(none)")[-STDERR_CHARS:]
        return chat_messages(self.template, language=item.language, problem=item.source["problem"],
                             solution_block=fenced(solution, item.language), check_label=label, checks_block=checks,
                             attempt=str(round_), verdict=str(execution.get("verdict")),
                             stderr_block=fenced(stderr, "text"), fence=item.language)

    async def run(self, item: WorkItem, ctx: GenerationContext) -> None:
        failing, sample_id = item.source, item.sample_id()
        assert failing is not None
        if ctx.already_done(item, sample_id):
            return
        base = {k: failing[k] for k in CARRIED if k in failing}
        round0 = int(failing.get("evol_round") or 0)
        solution, execution = failing["solution"], failing["execution"]
        history = [history_entry(0, solution, execution)]
        latest = new_sample(item, sample_id, {**base, "solution": solution}, {}, round0, failing["id"])
        for round_ in range(1, self.spec.rounds + 1):
            messages = self.messages(item, solution, execution, round_)
            try:
                answer = await ctx.ask(item, messages, lambda text: parse_repair_reply(text, item.language),
                                       key=f"{sample_id}/{round_}")
            except ReplyRejected as exc:
                history.append(history_entry(round_, None, {"verdict": "unparseable", "stderr_excerpt": exc.reason}))
                continue
            solution = answer.value["solution"]
            latest = new_sample(item, sample_id, {**base, "solution": solution}, answer.meta, round0, failing["id"])
            execution = latest["execution"] = await ctx.execute(latest)
            history.append(history_entry(round_, solution, execution))
            if passed(execution):
                ctx.accept({**latest, "repair_history": history})
                return
        ctx.reject({**latest, "repair_history": history}, "validation",
                   f"still failing after {self.spec.rounds} repair rounds")
