"""``python -m data_tools.generate --config RECIPE.yaml``: run a generation recipe (docs/synthesis.md)."""
from __future__ import annotations

import argparse
from typing import Sequence

from data_tools._common import run_cli
from data_tools.generate.config import load_generation_config
from data_tools.generate.runner import generate

PROG = "python -m data_tools.generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Generate synthetic code samples with teacher LLMs (OSS-Instruct, Evol-Instruct, "
                               "unit tests, benchmark-shaped problems, repair, textbook documents). Reruns resume.")
    parser.add_argument("--config", required=True, help="YAML or JSON recipe: teachers, strategies, languages, seed")
    parser.add_argument("--seeds", default=None, help="seed documents jsonl (overrides the recipe's seeds_path)")
    parser.add_argument("--output-dir", default=None, help="output directory (overrides the recipe's output_dir)")
    parser.add_argument("--no-validate", action="store_true", help="keep samples without running them (no repair)")
    parser.add_argument("--check", action="store_true",
                        help="only check the recipe, seeds, sandbox and teachers (one GET /v1/models each), then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        overrides = {"seeds_path": args.seeds, "output_dir": args.output_dir}
        if args.no_validate:
            overrides["validate"] = False
        config = load_generation_config(args.config, overrides)
        summary = generate(config, progress=not args.no_progress, check_only=args.check)
        if summary is None:
            print(f"{args.config}: recipe, seeds and {len(config.teachers)} teacher(s) are ready")
            return
        for line in summary.lines():
            print(line)

    run_cli(PROG, run)
