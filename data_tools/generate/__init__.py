"""Synthetic-data generation with teacher LLMs (docs/synthesis.md).

Strategies (each a prompt template in ``prompts/`` and a parser in ``strategies/``):
OSS-Instruct, Evol-Instruct for code, self-generated unit tests, HumanEval- and
LiveCodeBench-shaped problems, a repair loop driven by sandbox feedback, and textbook-style
documents. :func:`generate` runs a :class:`GenerationConfig` (a YAML/JSON recipe); it is
crash-safe and resumable: rerunning after ``kill -9`` finishes the run with every sample
written exactly once.
"""
from __future__ import annotations

from typing import Sequence

from data_tools.generate.config import GenerationConfig, StrategySpec, load_generation_config
from data_tools.generate.runner import GenerationSummary, generate

__all__ = ["GenerationConfig", "StrategySpec", "GenerationSummary", "generate", "load_generation_config", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m data_tools generate`` / ``python -m data_tools.generate``)."""
    from data_tools.generate.cli import main as cli_main

    cli_main(argv)
