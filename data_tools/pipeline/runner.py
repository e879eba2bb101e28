"""Run a validated recipe: stages in order, map stages shard by shard, skipping finished work.

Map stages run their pending shards through the configured executor (local process pool or
Ray); global stages run once in this process after every shard before them is finished.
Under ``executor.kind: slurm`` the same functions run inside the jobs, one stage (and for map
stages one shard) per job, as written by :mod:`data_tools.pipeline.slurm`.
"""
from __future__ import annotations

import collections
import os
import shutil
import time
from dataclasses import dataclass, field

from data_tools._common import DataToolError, iter_jsonl_objects
from data_tools.pipeline import shards
from data_tools.pipeline.context import GlobalContext, ShardContext
from data_tools.pipeline.executors import run_local, run_ray
from data_tools.pipeline.recipe import Recipe, StageEntry
from data_tools.records import file_sha256, write_json_atomic, write_records_atomic


@dataclass
class StageRun:
    """What one stage did in this invocation."""

    stage: str
    ran: list[int] = field(default_factory=list)  # shards run (global stages: [0] when run)
    skipped: list[int] = field(default_factory=list)  # shards whose marker was valid
    counts: dict = field(default_factory=dict)  # merged counts of all its shards (or the stage)
    elapsed_s: float = 0.0

    def line(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if not k.startswith("license_rejected"))
        return (f"[{self.stage}] ran {len(self.ran)}, skipped {len(self.skipped)} in {self.elapsed_s:.1f} s"
                + (f"; {counts}" if counts else ""))


def _input_path(recipe: Recipe, entry: StageEntry, shard: int) -> str:
    if entry.spec.plan is not None:
        return shards.shard_file(os.path.join(recipe.stage_dir(entry), shards.INPUTS_DIR), shard)
    return shards.shard_file(recipe.stage_dir(recipe.document_source(entry)), shard)


def _input_fingerprint(recipe: Recipe, entry: StageEntry, shard: int) -> str:
    if entry.spec.plan is not None:
        path = _input_path(recipe, entry, shard)
        if not os.path.isfile(path):
            raise DataToolError(f"stage {entry.id}: input {path!r} is missing; run the pipeline without "
                                "--shard once so that the stage's inputs are listed")
        return file_sha256(path)
    source = recipe.document_source(entry)
    fingerprint = shards.shard_fingerprint(recipe.stage_dir(source), shard)
    if fingerprint is None:
        raise DataToolError(f"stage {entry.id} shard {shard}: its input, shard {shard} of stage {source.id}, "
                            f"is not finished; run stage {source.id} first")
    return fingerprint


def map_shard_done(recipe: Recipe, entry: StageEntry, shard: int) -> bool:
    directory = recipe.stage_dir(entry)
    marker = shards.read_json(shards.shard_marker(directory, shard))
    return (marker is not None and marker["config_sha256"] == shards.config_sha256(entry.config)
            and marker["input_sha256"] == _input_fingerprint(recipe, entry, shard)
            and shards.outputs_intact(directory, {os.path.basename(shards.shard_file(directory, shard)): marker["output"]}))


def _remove_marker(path: str) -> None:
    """Outputs are about to change: a failed run must not leave a marker vouching for them."""
    if os.path.exists(path):
        os.remove(path)


def _shard_context(recipe: Recipe, entry: StageEntry, shard: int, input_sha: str,
                   progress: bool | None) -> dict:
    """``{"shard": ShardContext}`` for stages that asked for one, else no extra argument."""
    if not entry.spec.shard_context:
        return {}
    paths = [_input_path(recipe, entry, s) for s in range(recipe.num_shards)]
    return {"shard": ShardContext(stage_dir=recipe.stage_dir(entry), shard=shard, num_shards=recipe.num_shards,
                                  input_sha256=input_sha, input_paths=paths, progress=progress)}


def run_map_shard(recipe: Recipe, stage_index: int, shard: int, progress: bool | None = None) -> dict:
    """Run one shard of a map stage: input shard -> stage function -> output shard + marker."""
    entry = recipe.stages[stage_index]
    directory = recipe.stage_dir(entry)
    start, counts = time.perf_counter(), collections.Counter()
    input_sha = _input_fingerprint(recipe, entry, shard)
    _remove_marker(shards.shard_marker(directory, shard))

    def counted_inputs():
        for record in iter_jsonl_objects(_input_path(recipe, entry, shard)):
            counts["input"] += 1
            yield record

    extra = _shard_context(recipe, entry, shard, input_sha, progress)
    output = write_records_atomic(shards.shard_file(directory, shard),
                                  entry.spec.run(entry.config, counted_inputs(), counts, **extra))
    counts["output"] = output["records"]
    marker = {"stage": entry.id, "type": entry.spec.name, "shard": shard, "input_sha256": input_sha,
              "config_sha256": shards.config_sha256(entry.config), "output": output, "counts": dict(counts),
              "elapsed_s": round(time.perf_counter() - start, 3)}
    write_json_atomic(shards.shard_marker(directory, shard), marker)
    return marker


def write_plan(recipe: Recipe, entry: StageEntry) -> None:
    """List a planned stage's inputs and spread them over the shards (files rewritten only if changed)."""
    items = entry.spec.plan(entry.config)
    if not items:
        raise DataToolError(f"stage {entry.id}: its sources list no input at all; check the paths in the recipe")
    inputs_dir = os.path.join(recipe.stage_dir(entry), shards.INPUTS_DIR)
    for shard, shard_items in enumerate(shards.balance(items, recipe.num_shards, lambda it: it.get("bytes", 1))):
        path = shards.shard_file(inputs_dir, shard)
        fresh = write_records_atomic(path + ".new", shard_items)
        if os.path.isfile(path) and file_sha256(path) == fresh["sha256"]:
            os.remove(path + ".new")  # unchanged: keep the old file so nothing looks new
        else:
            os.replace(path + ".new", path)


def _merged_counts(markers: list[dict]) -> dict:
    total: collections.Counter = collections.Counter()
    for marker in markers:
        total.update(marker.get("counts", {}))
    return dict(total)


def run_map_stage(recipe: Recipe, entry: StageEntry, progress: bool | None = None) -> StageRun:
    start = time.perf_counter()
    if entry.spec.plan is not None:
        write_plan(recipe, entry)
    result = StageRun(entry.id)
    for shard in range(recipe.num_shards):
        (result.skipped if map_shard_done(recipe, entry, shard) else result.ran).append(shard)
    executor = recipe.executor
    # Progress bars of shards running side by side would overwrite each other's line.
    shard_progress = progress if executor.kind == "local" and min(executor.workers, len(result.ran)) <= 1 else False
    tasks = [(recipe, entry.index, shard, shard_progress) for shard in result.ran]
    if executor.kind == "ray" and tasks:
        run_ray(run_map_shard, tasks, executor.ray.address, executor.ray.num_cpus_per_task, entry.id, progress)
    else:
        run_local(run_map_shard, tasks, executor.workers, entry.id, progress)
    directory = recipe.stage_dir(entry)
    result.counts = _merged_counts([shards.read_json(shards.shard_marker(directory, s)) or {}
                                    for s in range(recipe.num_shards)])
    result.elapsed_s = time.perf_counter() - start
    return result


def _global_inputs(recipe: Recipe, entry: StageEntry) -> tuple[list[str], dict]:
    source = recipe.document_source(entry)
    directory = recipe.stage_dir(source)
    paths = [shards.shard_file(directory, s) for s in range(recipe.num_shards)]
    fingerprints = {str(s): _input_fingerprint(recipe, entry, s) for s in range(recipe.num_shards)}
    return paths, fingerprints


def global_stage_done(recipe: Recipe, entry: StageEntry) -> bool:
    directory = recipe.stage_dir(entry)
    marker = shards.read_json(os.path.join(directory, shards.STAGE_MARKER))
    return (marker is not None and marker["config_sha256"] == shards.config_sha256(entry.config)
            and marker["inputs"] == _global_inputs(recipe, entry)[1]
            and shards.outputs_intact(directory, marker["outputs"]))


def _context(recipe: Recipe, entry: StageEntry, inputs: list[str], progress: bool | None) -> GlobalContext:
    executor = recipe.executor
    # Inside a Slurm job the pool matches the CPUs the job was given.
    workers = executor.slurm.cpus_per_task if executor.kind == "slurm" else executor.workers
    earlier = [(e.id, e.spec.name, recipe.stage_dir(e)) for e in recipe.stages[:entry.index]]
    return GlobalContext(stage_dir=recipe.stage_dir(entry), input_shards=inputs, num_shards=recipe.num_shards,
                         workers=workers, recipe_raw=recipe.raw, earlier_stages=earlier, progress=progress)


def run_global_stage(recipe: Recipe, entry: StageEntry, progress: bool | None = None) -> StageRun:
    start = time.perf_counter()
    result = StageRun(entry.id)
    directory = recipe.stage_dir(entry)
    if global_stage_done(recipe, entry):
        result.skipped.append(0)
        result.counts = shards.read_json(os.path.join(directory, shards.STAGE_MARKER))["counts"]
        return result
    inputs, fingerprints = _global_inputs(recipe, entry)
    os.makedirs(directory, exist_ok=True)
    _remove_marker(os.path.join(directory, shards.STAGE_MARKER))
    ctx = _context(recipe, entry, inputs, progress)
    entry.spec.run(entry.config, ctx)
    shutil.rmtree(os.path.join(directory, shards.WORK_DIR), ignore_errors=True)
    marker = {"stage": entry.id, "type": entry.spec.name, "config_sha256": shards.config_sha256(entry.config),
              "inputs": fingerprints, "outputs": shards.stage_outputs(directory), "counts": dict(ctx.counts),
              "elapsed_s": round(time.perf_counter() - start, 3)}
    write_json_atomic(os.path.join(directory, shards.STAGE_MARKER), marker)
    result.ran.append(0)
    result.counts = dict(ctx.counts)
    result.elapsed_s = time.perf_counter() - start
    return result


def run_stage(recipe: Recipe, entry: StageEntry, progress: bool | None = None) -> StageRun:
    runner = run_map_stage if entry.spec.kind == "map" else run_global_stage
    return runner(recipe, entry, progress)


def run_pipeline(recipe: Recipe, progress: bool | None = None) -> list[StageRun]:
    """Run every stage in order on this machine (local pool or Ray for map stages)."""
    return [run_stage(recipe, entry, progress) for entry in recipe.stages]


def run_one_shard(recipe: Recipe, entry: StageEntry, shard: int) -> StageRun:
    """One shard of a map stage (what a Slurm array task runs); skipped if already done."""
    if entry.spec.kind != "map":
        raise DataToolError(f"--shard is for map stages; {entry.id} is a {entry.spec.kind} stage (drop --shard)")
    if not 0 <= shard < recipe.num_shards:
        raise DataToolError(f"--shard {shard} is out of range; the recipe has num_shards {recipe.num_shards} (0..{recipe.num_shards - 1})")
    result = StageRun(entry.id)
    if map_shard_done(recipe, entry, shard):
        result.skipped.append(shard)
    else:
        result.counts = run_map_shard(recipe, entry.index, shard)["counts"]
        result.ran.append(shard)
    return result
