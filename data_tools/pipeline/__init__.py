"""Run a YAML recipe of stages end to end: ``python -m data_tools pipeline recipe.yaml``.

Modules: recipe (schema and validation), registry (stage types), stages (builtin stages),
shards (shard files, done markers), runner (local/Ray execution), slurm (job scripts),
executors (process pool, Ray), cli (the command). See docs/data_tools.md.
"""
from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from data_tools.pipeline.cli import main as cli_main

    cli_main(argv)
