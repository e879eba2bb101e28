"""Slurm: one sbatch script per stage, chained with ``--dependency=afterok``, plus a submit.sh.

Map stages become job arrays whose task *k* runs shard *k*
(``python -m data_tools pipeline RECIPE --stage ID --shard K``); global stages become one job.
Each job re-reads a frozen copy of the recipe, checks the shard's done marker and skips
finished work, so resubmitting after a failure reruns only what is missing.

``slurm.dry_run: true`` (or ``--dry-run``) writes the scripts and submit.sh without calling
sbatch, to inspect them or submit by hand (``bash submit.sh``).
"""
from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field

from data_tools._common import DataToolError
from data_tools.pipeline.recipe import Recipe, SlurmConfig, StageEntry
from data_tools.pipeline.runner import write_plan
from data_tools.records import write_json_atomic

SLURM_DIR = "slurm"


@dataclass
class SlurmSubmission:
    """What :func:`submit_pipeline` wrote (and submitted unless a dry run)."""

    scripts: list[str] = field(default_factory=list)
    submit_script: str = ""
    job_ids: list[str] = field(default_factory=list)  # empty on a dry run


def _sbatch_header(config: SlurmConfig, job_name: str, log_dir: str, array: str | None) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --time={config.time}",
             f"#SBATCH --cpus-per-task={config.cpus_per_task}", f"#SBATCH --mem={config.mem_gb}G",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
             # %A_%a (array job, task) for arrays; %j (job id) otherwise.
             f"#SBATCH --output={log_dir}/{job_name}_" + ("%A_%a.log" if array else "%j.log")]
    if config.partition:
        lines.append(f"#SBATCH --partition={config.partition}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines.extend(f"#SBATCH {option}" for option in config.sbatch_options)
    return lines


def stage_script(recipe: Recipe, entry: StageEntry, frozen_recipe: str, log_dir: str, chunk: int) -> str:
    """The sbatch script of one stage; map stages: one array over shards [chunk*max, ...)."""
    config = recipe.executor.slurm
    command = [config.python, "-m", "data_tools", "pipeline", frozen_recipe, "--stage", entry.id]
    array = None
    if entry.spec.kind == "map":
        first = chunk * config.max_array_size
        count = min(config.max_array_size, recipe.num_shards - first)
        array = f"0-{count - 1}" + (f"%{config.max_parallel}" if config.max_parallel else "")
        command += ["--shard", f"$((SLURM_ARRAY_TASK_ID + {first}))"]
    # No `set -u`: environment setup scripts (venv activate, module load) often read unset variables.
    body = ["set -eo pipefail", f"cd {shlex.quote(os.getcwd())}", "export OMP_NUM_THREADS=1", config.setup,
            " ".join(part if part.startswith("$((") else shlex.quote(part) for part in command)]
    name = f"{entry.index:02d}_{entry.id}" + (f"_{chunk}" if chunk else "")
    return "\n".join(_sbatch_header(config, name, log_dir, array) + [""] + [b for b in body if b]) + "\n"


def _array_chunks(recipe: Recipe, entry: StageEntry) -> int:
    if entry.spec.kind != "map":
        return 1
    size = recipe.executor.slurm.max_array_size
    return (recipe.num_shards + size - 1) // size


def _submit_lines(stage_scripts: list[list[str]]) -> list[str]:
    """submit.sh: each stage's jobs wait for every job of the stage before it."""
    lines = ["#!/bin/bash", "# Submits the pipeline's stages in order; written by data_tools.pipeline.slurm.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "dep=''"]
    for scripts in stage_scripts:
        lines.append("ids=''")
        for script in scripts:
            lines.append(f'id=$(sbatch --parsable ${{dep:+--dependency=afterok:$dep}} {shlex.quote(os.path.basename(script))})')
            lines.append('ids="${ids:+$ids:}${id%%;*}"; echo "submitted $id"')
        lines.append('dep="$ids"')
    return lines


def submit_pipeline(recipe: Recipe, dry_run: bool = False) -> SlurmSubmission:
    """Write (and unless ``dry_run`` submit) the Slurm jobs of ``recipe``."""
    slurm_dir = os.path.join(recipe.output_dir, SLURM_DIR)
    log_dir = os.path.join(slurm_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    for entry in recipe.stages:  # inputs are listed here, once, not by racing array tasks
        if entry.spec.plan is not None:
            write_plan(recipe, entry)
    frozen = os.path.join(slurm_dir, "recipe.yaml")  # jobs read this, not the user's (editable) file
    write_json_atomic(frozen, recipe.raw)  # JSON is YAML; the atomic writer keeps it whole
    submission, per_stage = SlurmSubmission(), []
    for entry in recipe.stages:
        scripts = []
        for chunk in range(_array_chunks(recipe, entry)):
            path = os.path.join(slurm_dir, f"{entry.index:02d}_{entry.id}" + (f"_{chunk}" if chunk else "") + ".sbatch")
            with open(path, "w", encoding="utf-8") as f:
                f.write(stage_script(recipe, entry, frozen, log_dir, chunk))
            scripts.append(path)
        submission.scripts.extend(scripts)
        per_stage.append(scripts)
    submission.submit_script = os.path.join(slurm_dir, "submit.sh")
    with open(submission.submit_script, "w", encoding="utf-8") as f:
        f.write("\n".join(_submit_lines(per_stage)) + "\n")
    os.chmod(submission.submit_script, 0o755)
    if not (dry_run or recipe.executor.slurm.dry_run):
        submission.job_ids = _run_submit(submission.submit_script)
    return submission


def _run_submit(script: str) -> list[str]:
    try:
        done = subprocess.run(["bash", script], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise DataToolError(f"submitting {script} failed ({exc.stderr.strip()[-300:]}); jobs submitted before "
                            "the failure keep running; fix the cause and rerun (finished shards are skipped)") from None
    return [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("submitted ")]

