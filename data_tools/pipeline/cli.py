"""``python -m data_tools pipeline RECIPE``: validate a recipe, then run it (or submit it to Slurm).

Examples::

    python -m data_tools pipeline recipes/synthetic_python.yaml
    python -m data_tools pipeline recipe.yaml --dry-run            # slurm: write job scripts only
    python -m data_tools pipeline recipe.yaml --stage dedup        # one stage (what a Slurm job runs)
    python -m data_tools pipeline recipe.yaml --stage ingest --shard 3
    python -m data_tools pipeline --list-stages
"""
from __future__ import annotations

import argparse
from typing import Sequence

from data_tools._common import DataToolError, run_cli

PROG = "python -m data_tools pipeline"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    parser.add_argument("--stage", default=None, help="run only this stage (by id)")
    parser.add_argument("--shard", type=int, default=None, help="with --stage of a map stage: run only this shard")
    parser.add_argument("--dry-run", action="store_true",
                        help="slurm executor: write the sbatch scripts and submit.sh without submitting")
    parser.add_argument("--validate-only", action="store_true", help="check the recipe and exit")
    parser.add_argument("--list-stages", action="store_true", help="list the stage types recipes can use")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _list_stages() -> None:
    from data_tools.pipeline.registry import registered_stages

    for name, spec in sorted(registered_stages().items()):
        print(f"{name:14s} {spec.kind:6s}  {spec.help}")


def _run(args: argparse.Namespace) -> None:
    from data_tools.pipeline.recipe import load_recipe
    from data_tools.pipeline.runner import run_one_shard, run_pipeline, run_stage

    if args.shard is not None and args.stage is None:
        raise DataToolError("--shard needs --stage (the map stage the shard belongs to)")
    recipe = load_recipe(args.recipe)
    if recipe.executor.kind == "ray":
        from data_tools.pipeline.executors import require_ray

        require_ray()
    if args.validate_only:
        print(f"{args.recipe}: valid; stages: {', '.join(e.id for e in recipe.stages)}; {recipe.num_shards} shards")
        return
    progress = False if args.quiet else None
    if args.stage is not None:
        entry = recipe.stage(args.stage)
        runs = [run_one_shard(recipe, entry, args.shard) if args.shard is not None else run_stage(recipe, entry, progress)]
    elif recipe.executor.kind == "slurm":
        from data_tools.pipeline.slurm import submit_pipeline

        submission = submit_pipeline(recipe, dry_run=args.dry_run)
        submitted = f"submitted jobs {', '.join(submission.job_ids)}" if submission.job_ids else "not submitted (dry run)"
        print(f"wrote {len(submission.scripts)} sbatch scripts and {submission.submit_script}; {submitted}")
        return
    else:
        runs = run_pipeline(recipe, progress)
    for run in runs:
        print(run.line())
    print(f"outputs under {recipe.output_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.list_stages:
        _list_stages()
        return
    if not args.recipe:
        build_parser().error("the recipe argument is required (or --list-stages)")
    run_cli(PROG, lambda: _run(args))
