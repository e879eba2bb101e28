"""The YAML recipe: which stages run, in what order, on how many shards, with which executor.

Example (see recipes/synthetic_python.yaml)::

    output_dir: runs/synthetic_python
    num_shards: 4
    executor: {kind: local, workers: 2}
    stages:
      - stage: ingest
        sources: [{path: /usr/lib/python3.11/json, license: PSF-2.0}]
      - stage: dedup
      - stage: decontaminate
      - stage: report
      - stage: export
        tokenizer: data/tokenizer.model

Everything is validated by :func:`load_recipe` before any work: unknown stages and fields
(with the closest name suggested), wrong types, out-of-range values, missing input files,
and a stage that needs documents but has no earlier stage producing them.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from data_tools._common import DataToolError, read_yaml_file
from data_tools.pipeline.config_loader import check_input_paths, did_you_mean, from_dict
from data_tools.pipeline.registry import StageSpec, get_stage

EXECUTOR_KINDS = ("local", "slurm", "ray")


@dataclass
class SlurmConfig:
    """sbatch settings for ``executor.kind: slurm``."""

    partition: str | None = None
    """Partition (``#SBATCH --partition``); None leaves the cluster default."""
    time: str = "04:00:00"
    """Wall-clock limit of each job (and of each array task)."""
    cpus_per_task: int = 4
    """CPUs of each job; global stages use them as their process pool."""
    mem_gb: int = 16
    """Memory of each job in GiB."""
    max_parallel: int = 0
    """At most this many array tasks at once (``--array=0-N%max_parallel``); 0 = no limit."""
    max_array_size: int = 1000
    """The cluster's MaxArraySize: longer stages are split into several arrays."""
    setup: str = ""
    """Shell lines run before Python in every job (``module load``, ``source venv/bin/activate``)."""
    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter the jobs run ``-m data_tools`` with."""
    sbatch_options: list[str] = field(default_factory=list)
    """Extra sbatch options, e.g. ``["--account=proj", "--qos=high"]``."""
    dry_run: bool = False
    """Write the job scripts and submit.sh but do not call sbatch."""

    def check(self) -> None:
        if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", self.time):
            raise DataToolError(f"slurm.time {self.time!r} is not a Slurm time limit; use e.g. '04:00:00' or '1-00:00:00'")
        for name in ("cpus_per_task", "mem_gb", "max_array_size"):
            if getattr(self, name) < 1:
                raise DataToolError(f"slurm.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RayConfig:
    """Ray settings for ``executor.kind: ray`` (needs ``pip install ray``)."""

    address: str | None = None
    """Cluster to join (``auto`` for the running one, ``ray://host:10001``); None starts a local Ray."""
    num_cpus_per_task: float = 1.0
    """CPUs Ray reserves for each shard task."""


@dataclass
class ExecutorConfig:
    """Where shards run."""

    kind: str = "local"
    """local (a process pool on this machine), slurm (job arrays) or ray."""
    workers: int = 1
    """local: shards run at once; also the process pool size of global stages."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise DataToolError(f"executor.kind {self.kind!r} is not one of {', '.join(EXECUTOR_KINDS)}"
                                f"{did_you_mean(self.kind, EXECUTOR_KINDS)}")
        if self.workers < 1:
            raise DataToolError(f"executor.workers must be >= 1, got {self.workers}")


@dataclass
class StageEntry:
    """One validated entry of ``stages``."""

    id: str  # directory name and identity of the stage in this recipe
    spec: StageSpec
    config: Any
    index: int


@dataclass
class Recipe:
    """A validated recipe (see module doc)."""

    output_dir: str
    num_shards: int
    executor: ExecutorConfig
    stages: list[StageEntry]
    raw: dict  # the mapping as written, stored in manifests and handed to Slurm jobs
    path: str | None = None

    def stage(self, stage_id: str) -> StageEntry:
        for entry in self.stages:
            if entry.id == stage_id:
                return entry
        ids = [e.id for e in self.stages]
        raise DataToolError(f"recipe has no stage {stage_id!r}{did_you_mean(stage_id, ids)} (stages: {', '.join(ids)})")

    def stage_dir(self, entry: StageEntry) -> str:
        return os.path.join(self.output_dir, f"{entry.index:02d}_{entry.id}")

    def document_source(self, entry: StageEntry) -> StageEntry | None:
        """The nearest earlier stage whose output shards ``entry`` reads."""
        earlier = [e for e in self.stages[:entry.index] if e.spec.produces_documents]
        return earlier[-1] if earlier else None


TOP_LEVEL = ("output_dir", "num_shards", "executor", "stages")


def _stage_entries(raw_stages: Any, where: str) -> list[StageEntry]:
    if not isinstance(raw_stages, list) or not raw_stages:
        raise DataToolError(f"{where}: 'stages' must be a non-empty list of {{stage: NAME, ...fields}}")
    entries, seen = [], set()
    for index, item in enumerate(raw_stages):
        at = f"{where}: stages[{index}]"
        if not isinstance(item, dict) or "stage" not in item:
            raise DataToolError(f"{at}: expected a mapping with a 'stage' key (e.g. {{stage: dedup}})")
        fields = dict(item)
        name = str(fields.pop("stage"))
        stage_id = str(fields.pop("id", name))
        spec = get_stage(name, at)
        if stage_id in seen:
            raise DataToolError(f"{at}: stage id {stage_id!r} is used twice; give one of them another 'id:'")
        seen.add(stage_id)
        at = f"{at} ({stage_id})"
        config = from_dict(spec.config_cls, fields, at)
        check_input_paths(config, at)
        entries.append(StageEntry(id=stage_id, spec=spec, config=config, index=index))
    return entries


def _check_stage_inputs(recipe: Recipe, where: str) -> None:
    for entry in recipe.stages:
        needs_documents = entry.spec.plan is None
        if needs_documents and recipe.document_source(entry) is None:
            raise DataToolError(f"{where}: stages[{entry.index}] ({entry.id}) needs documents from an earlier "
                                "stage, but none comes before it; start the recipe with an ingest stage")


def recipe_from_mapping(raw: Any, where: str, path: str | None = None) -> Recipe:
    if not isinstance(raw, dict):
        raise DataToolError(f"{where}: a recipe is a YAML mapping with keys {', '.join(TOP_LEVEL)}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise DataToolError(f"{where}: unknown key {key!r}{did_you_mean(str(key), TOP_LEVEL)} "
                                f"(keys: {', '.join(TOP_LEVEL)})")
    if not isinstance(raw.get("output_dir"), str) or not raw["output_dir"]:
        raise DataToolError(f"{where}: 'output_dir' (a directory for all stage outputs) is required")
    num_shards = raw.get("num_shards", 1)
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise DataToolError(f"{where}: num_shards must be an integer >= 1, got {num_shards!r}")
    executor = from_dict(ExecutorConfig, raw.get("executor"), f"{where}: executor")
    recipe = Recipe(output_dir=os.path.abspath(raw["output_dir"]), num_shards=num_shards, executor=executor,
                    stages=_stage_entries(raw.get("stages"), where), raw=raw, path=path)
    _check_stage_inputs(recipe, where)
    return recipe


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe file; raises DataToolError naming the file and the field."""
    raw = read_yaml_file(path, "recipe")
    return recipe_from_mapping(raw, path, path=os.path.abspath(path))
