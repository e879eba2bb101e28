"""The stage registry: every stage a recipe may name, what it runs and how it is sharded.

Two kinds of stage:

- ``map``: runs once per shard, independently. ``run(config, records, counts)`` receives the
  shard's input records (an iterator of dicts) and a ``collections.Counter``, and yields the
  output records. The runner reads the input shard, writes the output shard atomically with a
  done marker, and records input/output counts plus ``counts`` in the marker. By default shard
  *i* reads shard *i* of the nearest earlier stage that produces documents; a stage that reads
  from outside the pipeline (ingest) gives ``plan(config) -> list of input records`` instead,
  which the runner spreads over the shards.
- ``global``: runs once, after every shard of the previous stages is done.
  ``run(config, ctx)`` gets a :class:`~data_tools.pipeline.context.GlobalContext` (input shard
  paths, its own directory, a process pool); a stage that produces documents writes
  ``ctx.num_shards`` output shards with ``ctx.write_shard``.

Registering a stage is a few lines, e.g. the generator (a map stage over the seed shards)::

    from data_tools.pipeline.registry import StageSpec, register_stage
    register_stage(StageSpec(name="generate", kind="map", config_cls=GenerateStageConfig,
                             run=generate_shard, shard_context=True, help="teacher LLM samples"))

where ``generate_shard(config, seeds, counts, shard)`` yields samples. ``shard_context=True`` is
for a map stage that keeps resumable state of its own (the generator's journal): it is called as
``run(config, records, counts, shard=ShardContext)``. Builtin stages are registered in
:mod:`data_tools.pipeline.stages`.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

from data_tools._common import DataToolError
from data_tools.pipeline.config_loader import did_you_mean

STAGE_KINDS = ("map", "global")


@dataclass(frozen=True)
class StageSpec:
    """A stage type that recipes can name."""

    name: str
    """The ``stage:`` value in a recipe."""
    kind: str
    """``map`` (per shard) or ``global`` (once, after all shards of earlier stages)."""
    config_cls: type
    """Dataclass of the stage's recipe fields."""
    run: Callable
    """map: ``run(config, records, counts) -> iterator of records``; global: ``run(config, ctx)``."""
    help: str = ""
    """One line for ``python -m data_tools pipeline --list-stages``."""
    produces_documents: bool = True
    """False for stages whose outputs are not document shards (report, export)."""
    plan: Callable | None = None
    """map stages that read from outside the pipeline: ``plan(config) -> list[dict]`` of inputs
    (each may carry ``"bytes"``, used to balance the shards)."""
    shard_context: bool = False
    """map stages: also pass ``shard=ShardContext(...)`` (shard index, stage directory, input digest,
    a state directory kept across crashes) to ``run``, for stages that resume work of their own."""

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if not dataclasses.is_dataclass(self.config_cls):
            raise ValueError(f"stage {self.name!r}: config_cls must be a dataclass")
        if (self.plan is not None or self.shard_context) and self.kind != "map":
            raise ValueError(f"stage {self.name!r}: only map stages take a plan or a shard context")


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    """Add ``spec``; registering the same name twice is a programming error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"stage {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def registered_stages() -> dict[str, StageSpec]:
    importlib.import_module("data_tools.pipeline.stages")  # importing it registers the builtin stages

    return dict(_REGISTRY)


def get_stage(name: str, where: str) -> StageSpec:
    stages = registered_stages()
    if name not in stages:
        raise DataToolError(f"{where}: unknown stage {name!r}{did_you_mean(name, stages)} "
                            f"(stages: {', '.join(sorted(stages))})")
    return stages[name]
