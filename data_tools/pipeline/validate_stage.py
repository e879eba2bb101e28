"""The ``validate`` stage: run every sample's tests in the execution sandbox (data_tools.sandbox).

Each sample gets its ``execution`` record (verdict, excerpts, times, isolation) and the shard's
marker counts ``verdict.<verdict>``, which the report turns into the stage's pass rate. Passing
samples go downstream; failing ones are kept too (unless ``keep_failing: false``): export leaves
them out of pretraining and SFT data and pairs them with passing solutions of the same problem
for DPO, and dedup passes them through (see data_tools/dedup.py). Records with nothing to run
(seed and textbook documents) pass through unexecuted.
"""
from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tqdm import tqdm

from data_tools._common import DataToolError
from data_tools.generate.validation import execution_record, sandbox_config
from data_tools.pipeline.context import ShardContext
from data_tools.records import execution_verdict, is_sample


@dataclass
class ValidateStageConfig:
    """How samples are executed, and what happens to those that fail."""

    sandbox: dict[str, object] = field(default_factory=dict)
    """SandboxConfig fields (timeout_s, cpu_s, memory_mb, workers, ...; docs/sandbox.md). ``workers`` runs per
    shard: shards running side by side (executor.workers) each have that many."""
    revalidate: bool = False
    """Also run samples that already carry an execution record (validated during generation)."""
    keep_failing: bool = True
    """Keep samples that did not pass, with their execution record, for DPO pairs (export keeps them out of
    pretraining and SFT data). False drops them here."""
    batch_size: int = 256
    """Samples handed to the sandbox at once (bounds memory; each batch keeps every worker busy)."""

    def check(self) -> None:
        if self.batch_size < 1:
            raise DataToolError(f"batch_size must be >= 1, got {self.batch_size}")
        sandbox_config(self.sandbox, "sandbox")


def _execute(batch: list[dict], sandbox, config: ValidateStageConfig) -> int:
    """Set ``execution`` on the samples of ``batch`` that need a run; returns how many ran."""
    from data_tools.sandbox import validate_samples
    from data_tools.sandbox.validate import check_sample

    pending = [r for r in batch if is_sample(r) and (config.revalidate or execution_verdict(r) is None)]
    for record in pending:
        check_sample(record, f"sample {record.get('id')!r}")  # names the record, before any is run
    for record, result in zip(pending, validate_samples(pending, sandbox) if pending else []):
        record["execution"] = execution_record(result)
    return len(pending)


def validate_shard(config: ValidateStageConfig, records: Iterable[dict], counts,
                   shard: ShardContext) -> Iterator[dict]:
    """Map stage ``validate``: every record, samples with their ``execution`` set; see the module doc."""
    sandbox = sandbox_config({"progress": False, **config.sandbox}, "sandbox")
    show = sys.stderr.isatty() if shard.progress is None else shard.progress
    records = iter(records)
    with tqdm(desc=f"validate shard {shard.shard}", unit="sample", disable=not show) as bar:
        while batch := list(itertools.islice(records, config.batch_size)):
            counts["executed"] += _execute(batch, sandbox, config)
            bar.update(len(batch))
            for record in batch:
                verdict = execution_verdict(record) if is_sample(record) else None
                if verdict is None:
                    counts["not_executable"] += 1
                    yield record
                    continue
                counts[f"verdict.{verdict}"] += 1
                if verdict == "pass" or config.keep_failing:
                    yield record
                else:
                    counts["dropped_failing"] += 1
