"""What a generation run does: which strategies, how many items, which teachers, where outputs go.

A recipe is YAML or JSON (see docs/synthesis.md)::

    seed: 1234
    seeds_path: data/seed.jsonl
    output_dir: data/synth
    languages: [python]
    teachers:
      - {name: coder32b, base_url: "http://gpu1:8000/v1", model: Qwen/Qwen2.5-Coder-32B-Instruct, weight: 3}
      - {name: coder7b,  base_url: "http://gpu2:8000/v1", model: Qwen/Qwen2.5-Coder-7B-Instruct}
    strategies:
      - {name: oss_instruct, count: 1000}
      - {name: evol_instruct, source: oss_instruct, rounds: 3}
      - {name: repair, rounds: 2}
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from data_tools._common import DataToolError
from data_tools.pipeline.config_loader import from_dict
from data_tools.generate.templates import LANGUAGES, evol_mutations
from data_tools.teacher.config import TeacherConfig

# Strategies that start from seed documents, and those that start from earlier samples.
SEEDED_STRATEGIES = ("oss_instruct", "humaneval_style", "livecodebench_style", "textbook")
SAMPLE_STRATEGIES = ("evol_instruct", "unit_tests", "repair")
STRATEGIES = SEEDED_STRATEGIES + SAMPLE_STRATEGIES


@dataclass
class StrategySpec:
    """One strategy of a run and how much of it to do."""

    name: str
    """Strategy: oss_instruct, humaneval_style, livecodebench_style, textbook, evol_instruct, unit_tests or repair."""
    count: int = 0
    """Seeded strategies: number of items (seeds are cycled when count exceeds them). Sample strategies: at most
    this many source samples, chosen by id (0 = all)."""
    rounds: int = 1
    """evol_instruct: evolution rounds K per source sample; repair: most fix attempts per failing sample."""
    source: str | None = None
    """Sample strategies: an earlier strategy of this run, or a path to a samples jsonl. repair's default is the
    validation failures of every earlier strategy; evol_instruct's is oss_instruct."""
    mutations: list[str] | None = None
    """evol_instruct: mutation ids to draw from (default: all in prompts/evol_mutations.md)."""

    def __post_init__(self) -> None:
        where = f"strategy {self.name!r}"
        if self.name not in STRATEGIES:
            raise DataToolError(f"unknown strategy {self.name!r}; expected one of {', '.join(STRATEGIES)}")
        if self.count < 0 or (self.name in SEEDED_STRATEGIES and self.count == 0):
            raise DataToolError(f"{where}: count must be {'> 0' if self.name in SEEDED_STRATEGIES else '>= 0'}, "
                                f"got {self.count}")
        if self.rounds < 1:
            raise DataToolError(f"{where}: rounds must be >= 1, got {self.rounds}")
        if self.name == "evol_instruct" and self.source is None:
            self.source = "oss_instruct"
        if self.name == "unit_tests" and self.source is None:
            raise DataToolError(f"{where}: needs source: an earlier strategy or a samples jsonl to write tests for")
        unknown = set(self.mutations or ()) - set(evol_mutations())
        if unknown:
            raise DataToolError(f"{where}: unknown mutations {sorted(unknown)}; known: {', '.join(evol_mutations())}")


@dataclass
class GenerationConfig:
    """A whole generation run."""

    teachers: list[TeacherConfig]
    """Teacher endpoints; each work item goes to one, drawn by weight from a seeded RNG."""
    strategies: list[StrategySpec]
    """Strategies, run in this order (sample strategies read the outputs of earlier ones)."""
    output_dir: str = ""
    """Directory of samples.jsonl (accepted), rejected.jsonl and, by default, the teacher cache."""
    seeds_path: str | None = None
    """Seed documents jsonl (``text`` and ideally ``id``, ``language``, ``source``); needed by seeded strategies."""
    languages: list[str] = field(default_factory=lambda: ["python"])
    """Languages of generated samples; each item draws one (humaneval_style is always Python)."""
    seed: int = 0
    """Seed of every deterministic choice: teacher, language, snippet window, mutation."""
    cache_path: str | None = None
    """SQLite reply cache (default: OUTPUT_DIR/teacher_cache.sqlite); share it between runs to reuse replies."""
    snippet_lines: int = 40
    """Longest seed snippet shown to the teacher, in lines (a window of the seed file)."""
    validate: bool = True
    """Run every sample's tests in the sandbox and keep only passing ones (textbook documents are not run)."""
    sandbox: dict[str, object] = field(default_factory=dict)
    """SandboxConfig fields (timeout_s, memory_mb, workers, ...) for validation."""
    validation_batch: int = 16
    """Most samples handed to the sandbox in one call."""

    def __post_init__(self) -> None:
        if not self.teachers:
            raise DataToolError("teachers: a run needs at least one teacher")
        if not self.strategies:
            raise DataToolError("strategies: a run needs at least one strategy")
        _require_unique([t.name for t in self.teachers], "teachers", "name")
        _require_unique([s.name for s in self.strategies], "strategies", "name")
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if unknown or not self.languages:
            raise DataToolError(f"languages: {unknown or 'empty list'} not supported; "
                                f"choose from {', '.join(LANGUAGES)}")
        if self.snippet_lines < 1 or self.validation_batch < 1:
            raise DataToolError("snippet_lines and validation_batch must be >= 1")
        if not self.output_dir:
            raise DataToolError("output_dir is not set; give it in the recipe or with --output-dir")
        seeded = [s.name for s in self.strategies if s.name in SEEDED_STRATEGIES]
        if seeded and not self.seeds_path:
            raise DataToolError(f"strategy {seeded[0]!r} needs seed documents: set seeds_path in the recipe or "
                                "pass --seeds (a jsonl from `python -m data_tools seed_corpus` or ingestion)")
        self._check_sources()

    def _check_sources(self) -> None:
        earlier: list[str] = []
        for spec in self.strategies:
            source = spec.source
            if source is not None and source not in earlier and not os.path.isfile(source):
                raise DataToolError(f"strategy {spec.name!r}: source {source!r} is neither an earlier strategy of "
                                    f"this run ({', '.join(earlier) or 'none'}) nor an existing samples jsonl")
            earlier.append(spec.name)

    @classmethod
    def from_dict(cls, values: dict, where: str = "recipe") -> "GenerationConfig":
        """Build from a parsed recipe; unknown or mistyped fields are errors naming ``where`` and the field."""
        return from_dict(cls, values, where)

    @property
    def cache_file(self) -> str:
        return self.cache_path or os.path.join(self.output_dir, "teacher_cache.sqlite")


def _require_unique(names: list[str], where: str, key: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise DataToolError(f"{where}: {key} {name!r} appears twice; each must be unique")
        seen.add(name)


def load_generation_config(path: str, overrides: dict | None = None) -> GenerationConfig:
    """Read a YAML/JSON recipe; ``overrides`` (from command-line flags) replace its top-level fields."""
    if not os.path.isfile(path):
        raise DataToolError(f"--config {path!r} does not exist; pass a YAML or JSON recipe (see docs/synthesis.md)")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise DataToolError(f"--config {path!r} is not valid YAML/JSON: {exc}") from None
    if not isinstance(values, dict):
        raise DataToolError(f"--config {path!r}: expected a mapping at the top level, got {type(values).__name__}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return GenerationConfig.from_dict(values, where=path)
