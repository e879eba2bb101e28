"""What a stage gets to work with (see registry.py): a global stage its inputs, its directory and a
process pool; a map stage with ``shard_context`` its shard's place in the run."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from data_tools.pipeline import shards
from data_tools.pipeline.executors import run_local
from data_tools.records import write_records_atomic


@dataclass
class GlobalContext:
    """Inputs and helpers of one run of a global stage."""

    stage_dir: str
    """The stage's output directory (exists)."""
    input_shards: list[str]
    """Document shards of the nearest earlier document-producing stage, in shard order."""
    num_shards: int
    """How many output shards a document-producing stage writes."""
    workers: int
    """Size of the process pool :meth:`map` uses."""
    recipe_raw: dict
    """The recipe as written (exporters store it in their manifest)."""
    earlier_stages: list[tuple[str, str, str]]
    """``(stage id, stage type, directory)`` of every earlier stage, in order (the report reads their markers)."""
    progress: bool | None = None
    counts: collections.Counter = field(default_factory=collections.Counter)
    """Counts the stage wants in its marker (input/output documents, removals by reason)."""

    def output_shard(self, shard: int) -> str:
        return shards.shard_file(self.stage_dir, shard)

    def write_shard(self, shard: int, records: Iterable[dict]) -> dict:
        """Write output shard ``shard`` atomically; returns its sha256/bytes/records."""
        return write_records_atomic(self.output_shard(shard), records)

    @property
    def work_dir(self) -> str:
        """Scratch space, deleted once the stage succeeds."""
        path = os.path.join(self.stage_dir, shards.WORK_DIR)
        os.makedirs(path, exist_ok=True)
        return path

    def map(self, fn: Callable, tasks: Sequence[tuple], desc: str) -> list:
        """``[fn(*task) for task in tasks]`` over the stage's process pool, in order."""
        return run_local(fn, tasks, self.workers, desc, self.progress)


@dataclass
class ShardContext:
    """One shard of a map stage that keeps resumable state of its own (``StageSpec.shard_context``)."""

    stage_dir: str
    """The stage's output directory."""
    shard: int
    """Index of this shard."""
    num_shards: int
    """Shards of the stage."""
    input_sha256: str
    """Digest of this shard's input; with the config's digest it identifies one run of the shard."""
    input_paths: list[str]
    """Every input shard of the stage, in order (all finished), e.g. to take a share of a stage-wide count."""
    progress: bool | None = None
    """Show progress bars (None: when stderr is a terminal); False when shards run in parallel."""

    @property
    def state_dir(self) -> str:
        """A directory of this shard that survives crashes and reruns (the runner never deletes it)."""
        path = os.path.join(self.stage_dir, shards.STATE_DIR, f"shard-{self.shard:05d}")
        os.makedirs(path, exist_ok=True)
        return path
