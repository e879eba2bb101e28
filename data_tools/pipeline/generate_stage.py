"""The ``generate`` and ``repair`` stages: the generation runner (:mod:`data_tools.generate`) per shard.

Why map stages: the runner's crash safety is per output directory (an append-only journal
of records with deterministic ids, an SQLite reply cache, one writer at a time), and a
shard is exactly such a unit. Shard *i* runs :func:`data_tools.generate.generate` on the
seed documents of input shard *i*, journaling into its own directory under the stage's
``_state/shard-0000i/``:

- ``run-<key>/``: the journal (``samples.jsonl``, ``rejected.jsonl``) and the shard's seeds,
  where ``key`` hashes the stage config and the input shard's digest. A rerun of the same
  shard with the same config and input reopens it: ids already written are skipped, the rest
  redone, so ``kill -9`` at any moment loses and duplicates nothing. A changed config or
  input is a different run and starts a fresh journal (the stale one is removed once the new
  one finishes).
- ``teacher_cache.sqlite``: the shard's reply cache (unless ``cache_path`` is set), kept
  across runs, so only requests never answered cost anything. One file per shard keeps
  SQLite off concurrent writers on shared file systems.

The output shard is written (temp + rename, then the done marker) only once the shard's
generation has finished, sorted by id, so it does not depend on what crashed in between;
finished shards are skipped by the runner's markers like any other stage.

Counts are stage-wide: a strategy's ``count`` is split over the shards in proportion to the
size of their input shards (the parts sum to ``count``; an empty shard gets none).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from data_tools._common import DataToolError, iter_jsonl_objects
from data_tools.generate.config import GenerationConfig, StrategySpec
from data_tools.generate.journal import ACCEPTED, FILE_NAMES, REJECTED
from data_tools.generate.validation import sandbox_config
from data_tools.pipeline.context import ShardContext
from data_tools.pipeline.shards import config_sha256
from data_tools.records import execution_verdict, write_records_atomic

RUN_PREFIX = "run-"


@dataclass
class GenerateStageConfig(GenerationConfig):
    """A generation recipe as a pipeline stage: the seeds are the previous stage's documents, the outputs
    go to the stage's directory, and each strategy's ``count`` is the total over all shards."""

    output_dir: str = field(default="(the stage directory)", init=False)
    """Set by the pipeline: each shard journals under the stage's ``_state/`` directory."""
    seeds_path: str | None = field(default="(the input shard)", init=False)
    """Set by the pipeline: the seed documents are the shard's input records."""

    def check(self) -> None:
        for teacher in self.teachers:
            teacher.api_key()  # a missing API-key variable is found when the recipe loads, not hours later
        names = [spec.name for spec in self.strategies]
        if self.validate:
            sandbox_config(self.sandbox, "sandbox")
        elif "repair" in names:
            raise DataToolError("strategy 'repair' needs validate: true (a fix is only known to work once it has run)")
        for spec in self.strategies:
            if spec.source is not None and spec.source not in names:
                raise DataToolError(f"strategy {spec.name!r}: source {spec.source!r} is a file; in a pipeline every "
                                    "shard would repeat it. Name an earlier strategy of this stage, or run "
                                    "`python -m data_tools generate` on that file")


def _default_repair() -> list[StrategySpec]:
    return [StrategySpec(name="repair")]


@dataclass
class RepairStageConfig(GenerateStageConfig):
    """The repair strategy as a pipeline stage after ``validate``: failing samples of the input go back to a
    teacher with the sandbox's verdict; fixed versions are added next to them."""

    strategies: list[StrategySpec] = field(default_factory=_default_repair)
    """Only ``repair`` (its ``rounds``, and ``count``: at most this many failing samples over all shards, 0 = all)."""

    def check(self) -> None:
        if [spec.name for spec in self.strategies] != ["repair"] or self.strategies[0].source is not None:
            raise DataToolError("strategies: a repair stage runs exactly one strategy, {name: repair, rounds: N}, "
                                "on the failing samples of its input (no source); put other strategies in a "
                                "generate stage")
        super().check()


def share(total: int, weights: list[int], index: int) -> int:
    """Shard ``index``'s part of ``total``, in proportion to ``weights``; the parts of all shards sum to ``total``."""
    whole = sum(weights)
    if whole == 0:
        return 0
    before = sum(weights[:index])
    return total * (before + weights[index]) // whole - total * before // whole


def shard_strategies(strategies: list[StrategySpec], shard: ShardContext) -> list[StrategySpec]:
    """The strategies with this shard's share of each ``count``; a share of 0 drops the strategy and
    every strategy that reads its samples."""
    weights = [os.path.getsize(path) if os.path.exists(path) else 0 for path in shard.input_paths]
    names = {spec.name for spec in strategies}
    kept: list[StrategySpec] = []
    for spec in strategies:
        if spec.source in names and spec.source not in {s.name for s in kept}:
            continue  # its source strategy has nothing to do in this shard
        if spec.count:
            part = share(spec.count, weights, shard.shard)
            if part == 0:
                continue
            spec = dataclasses.replace(spec, count=part)
        kept.append(spec)
    return kept


def run_dir(config: GenerateStageConfig, shard: ShardContext) -> str:
    """This shard's journal directory for this config and input (created)."""
    key = hashlib.sha256(f"{config_sha256(config)}/{shard.input_sha256}".encode()).hexdigest()[:16]
    path = os.path.join(shard.state_dir, RUN_PREFIX + key)
    os.makedirs(path, exist_ok=True)
    return path


def _remove_stale_runs(shard: ShardContext, current: str) -> None:
    for name in os.listdir(shard.state_dir):
        if name.startswith(RUN_PREFIX) and name != current:
            shutil.rmtree(os.path.join(shard.state_dir, name), ignore_errors=True)


def journaled_samples(run_dir: str) -> list[dict]:
    """Accepted samples and executed failures (for DPO pairs) of a finished run, sorted by id.

    Replies the parser refused, and repair attempts that never ran, carry no execution and
    are left out.
    """
    records = list(iter_jsonl_objects(os.path.join(run_dir, FILE_NAMES[ACCEPTED])))
    for record in iter_jsonl_objects(os.path.join(run_dir, FILE_NAMES[REJECTED])):
        if isinstance(record.get("execution"), dict) and record.get("rejection", {}).get("stage") == "validation":
            records.append({k: v for k, v in record.items() if k != "rejection"})
    return sorted(records, key=lambda record: record["id"])


def run_shard_generation(config: GenerateStageConfig, strategies: list[StrategySpec], journal_dir: str,
                         seeds_path: str | None, shard: ShardContext, counts) -> list[dict]:
    """Generate into this shard's journal (resuming it), then return its samples."""
    from data_tools.generate.runner import generate  # heavy (openai, asyncio): only when a shard runs

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(GenerationConfig)}
    values.update(output_dir=journal_dir, seeds_path=seeds_path, strategies=strategies,
                  cache_path=config.cache_path or os.path.join(shard.state_dir, "teacher_cache.sqlite"))
    progress = sys.stderr.isatty() if shard.progress is None else shard.progress
    summary = generate(GenerationConfig(**values), progress=progress)
    for strategy, numbers in summary.counts.items():
        counts.update({f"{strategy}.{key}": value for key, value in numbers.items()})
    for teacher, numbers in summary.teachers.items():
        counts.update({f"teacher.{teacher}.{key}": value for key, value in numbers.items()})
    _remove_stale_runs(shard, os.path.basename(journal_dir))
    samples = journaled_samples(journal_dir)
    for sample in samples:
        verdict = execution_verdict(sample)
        if verdict is not None:
            counts[f"verdict.{verdict}"] += 1
    return samples


def generate_shard(config: GenerateStageConfig, seeds: Iterable[dict], counts, shard: ShardContext) -> Iterator[dict]:
    """Map stage ``generate``: this shard's seed documents -> samples (accepted, and executed failures)."""
    seeds = list(seeds)
    strategies = shard_strategies(config.strategies, shard)
    if not seeds or not strategies:
        counts["shards_without_work"] += 1
        return
    journal_dir = run_dir(config, shard)
    seeds_path = os.path.join(journal_dir, "seeds.jsonl")
    write_records_atomic(seeds_path, seeds)
    yield from run_shard_generation(config, strategies, journal_dir, seeds_path, shard, counts)


def repair_shard(config: RepairStageConfig, records: Iterable[dict], counts, shard: ShardContext) -> Iterator[dict]:
    """Map stage ``repair``: every input record, then the passing repairs of its failing samples."""
    records = list(records)
    # sandbox_error is the machine's failure, not the sample's: nothing for a teacher to fix.
    failing = [r for r in records if execution_verdict(r) not in (None, "pass", "sandbox_error")]
    counts["repair_candidates"] += len(failing)
    yield from records
    if not failing:
        return
    journal_dir = run_dir(config, shard)
    failing_path = os.path.join(journal_dir, "failing.jsonl")
    write_records_atomic(failing_path, failing)
    strategies = shard_strategies([dataclasses.replace(config.strategies[0], source=failing_path)], shard)
    if strategies:
        samples = run_shard_generation(config, strategies, journal_dir, None, shard, counts)
        yield from (s for s in samples if s["strategy"] == "repair" and execution_verdict(s) == "pass")
