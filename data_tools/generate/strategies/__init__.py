"""Generation strategies, one per module; each is a prompt template (prompts/<name>.md) and a parser."""
from __future__ import annotations

from data_tools.generate.config import GenerationConfig, StrategySpec
from data_tools.generate.strategies.base import Strategy
from data_tools.generate.strategies.evol_instruct import EvolInstruct
from data_tools.generate.strategies.humaneval_style import HumanEvalStyle
from data_tools.generate.strategies.livecodebench_style import LiveCodeBenchStyle
from data_tools.generate.strategies.oss_instruct import OssInstruct
from data_tools.generate.strategies.repair import Repair
from data_tools.generate.strategies.textbook import Textbook
from data_tools.generate.strategies.unit_tests import UnitTests

STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (OssInstruct, HumanEvalStyle, LiveCodeBenchStyle, Textbook, EvolInstruct, UnitTests, Repair)
}


def make_strategy(spec: StrategySpec, config: GenerationConfig) -> Strategy:
    return STRATEGY_CLASSES[spec.name](spec, config)
