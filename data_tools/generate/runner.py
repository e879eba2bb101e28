"""Run a generation recipe: check everything, then each strategy in order over its work items.

Order of work: cheap checks (recipe, API-key variables, seeds file, sandbox options and
toolchains), one ``GET /v1/models`` per teacher, then the strategies one after the other (a
sample strategy reads what the earlier ones wrote). Within a strategy, items run concurrently;
each teacher's client bounds its own requests in flight. A teacher that keeps failing stops the
run with a :class:`TeacherError`; everything written so far stays, and rerunning the same
command resumes (see :mod:`data_tools.generate.journal`).
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from data_tools._common import DataToolError
from data_tools.generate.config import SEEDED_STRATEGIES, GenerationConfig
from data_tools.generate.context import GenerationContext
from data_tools.generate.journal import SampleJournal
from data_tools.generate.seeds import load_seeds
from data_tools.generate.sources import strategy_inputs
from data_tools.generate.strategies import make_strategy
from data_tools.generate.strategies.base import Strategy
from data_tools.generate.validation import BatchValidator, Validator, sandbox_validator
from data_tools.generate.work import WorkItem
from data_tools.teacher.cache import ResponseCache
from data_tools.teacher.client import TeacherClient
from data_tools.teacher.preflight import check_teacher


@dataclass
class GenerationSummary:
    """What one :func:`generate` call did."""

    output_dir: str
    counts: dict[str, dict[str, int]]
    """Per strategy: accepted, rejected_parse, rejected_validation, done_before (skipped: written by an earlier run)."""
    teachers: dict[str, dict[str, int]]
    """Per teacher: requests (HTTP attempts), retries, cache_hits, rejected_replies."""
    dropped_torn_lines: int
    """Torn last lines removed from the outputs of a crashed earlier run."""

    def lines(self) -> list[str]:
        out = []
        for name, c in self.counts.items():
            out.append(f"{name}: {c.get('accepted', 0)} accepted, {c.get('rejected_parse', 0)} rejected by the parser, "
                       f"{c.get('rejected_validation', 0)} failed validation, {c.get('done_before', 0)} done before")
        for name, c in self.teachers.items():
            out.append(f"teacher {name}: {c.get('requests', 0)} requests, {c.get('retries', 0)} retries, "
                       f"{c.get('cache_hits', 0)} cache hits, {c.get('rejected_replies', 0)} replies rejected")
        if self.dropped_torn_lines:
            out.append(f"dropped {self.dropped_torn_lines} torn line(s) left by an interrupted run")
        out.append(f"outputs: {os.path.join(self.output_dir, 'samples.jsonl')}, "
                   f"{os.path.join(self.output_dir, 'rejected.jsonl')}")
        return out


def generate(config: GenerationConfig, *, validator: Validator | None = None, progress: bool = False,
             check_only: bool = False) -> GenerationSummary | None:
    """Run ``config``; ``validator(samples) -> results`` replaces the sandbox (default: its validate_samples).

    With ``check_only`` the inputs and teachers are checked and nothing is generated.
    """
    for teacher in config.teachers:
        teacher.api_key()  # names a missing environment variable before anything else
    if not config.validate and any(s.name == "repair" for s in config.strategies):
        raise DataToolError("strategy 'repair' needs validate: true (a fix is only known to work once it has run)")
    seeds = load_seeds(config.seeds_path) if any(s.name in SEEDED_STRATEGIES for s in config.strategies) else []
    # Textbook documents are never executed: a textbook-only run needs no sandbox.
    validating = config.validate and any(s.name != "textbook" for s in config.strategies)
    if validating and validator is None:
        validator = sandbox_validator(config.sandbox, config.languages)
    return asyncio.run(_generate(config, seeds, validator if validating else None, progress, check_only))


async def _generate(config: GenerationConfig, seeds: list[dict], validator: Validator | None, progress: bool,
                    check_only: bool) -> GenerationSummary | None:
    await asyncio.gather(*(check_teacher(t) for t in config.teachers))
    if check_only:
        return None
    with SampleJournal(config.output_dir) as journal, ResponseCache(config.cache_file) as cache:
        clients = {t.name: TeacherClient(t, cache) for t in config.teachers}
        batcher = BatchValidator(validator, config.validation_batch) if validator is not None else None
        ctx = GenerationContext(config, clients, journal, batcher)
        try:
            earlier: list[str] = []
            for spec in config.strategies:
                strategy = make_strategy(spec, config)
                items = list(strategy.work_items(strategy_inputs(spec, journal, earlier, seeds)))
                await run_stage(strategy, items, ctx, progress)
                earlier.append(spec.name)
        finally:
            for client in clients.values():
                await client.aclose()
            if batcher is not None:
                await batcher.aclose()
        return GenerationSummary(
            output_dir=config.output_dir, counts={s.name: dict(ctx.counts[s.name]) for s in config.strategies},
            teachers={name: dict(c.stats) for name, c in clients.items()},
            dropped_torn_lines=journal.dropped_torn_lines)


async def run_stage(strategy: Strategy, items: Sequence[WorkItem], ctx: GenerationContext, progress: bool) -> None:
    """Run every item, at most twice the teachers' total concurrency at a time; the first error stops the stage."""
    limit = 2 * sum(client.config.max_concurrency for client in ctx.clients.values())
    pending: set[asyncio.Task] = set()
    with tqdm(total=len(items), desc=strategy.name, unit="item", disable=not progress) as bar:
        try:
            for item in items:
                while len(pending) >= limit:
                    pending = await _reap(pending, bar)
                pending.add(asyncio.create_task(strategy.run(item, ctx)))
            while pending:
                pending = await _reap(pending, bar)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _reap(pending: set[asyncio.Task], bar: tqdm) -> set[asyncio.Task]:
    done, still_pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        bar.update(1)
        task.result()  # re-raises the item's error (TeacherError, a validator crash)
    return still_pending
