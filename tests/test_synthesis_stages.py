"""The generate / validate / repair pipeline stages in isolation: count shares, recipe checks,
verdict counting with the real sandbox, and dedup passing failing samples through for DPO.
The whole flow runs in tests/test_synthesis_e2e.py."""
from __future__ import annotations

import collections
import os

import pytest
import yaml

from data_tools._common import DataToolError, iter_jsonl_objects
from data_tools.dedup import DedupConfig, deduplicate
from data_tools.generate.config import GenerationConfig, StrategySpec
from data_tools.pipeline.context import ShardContext
from data_tools.pipeline.generate_stage import GenerateStageConfig, RepairStageConfig, share, shard_strategies
from data_tools.pipeline.recipe import load_recipe
from data_tools.pipeline.validate_stage import ValidateStageConfig, validate_shard
from data_tools.records import write_records_atomic
from megatron_code.config_docs import field_docs, undocumented_fields

TEACHER = {"name": "coder", "base_url": "http://127.0.0.1:9/v1", "model": "coder"}


def shard_context(tmp_path, sizes: list[int], shard: int) -> ShardContext:
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"in-{index}.jsonl"
        path.write_bytes(b"x" * size)
        paths.append(str(path))
    return ShardContext(stage_dir=str(tmp_path / "stage"), shard=shard, num_shards=len(sizes), input_sha256="0" * 64,
                        input_paths=paths, progress=False)


def test_counts_are_split_over_shards_by_input_size():
    weights = [300, 0, 100, 600]
    for total in (0, 1, 7, 10, 1000):
        parts = [share(total, weights, i) for i in range(len(weights))]
        assert sum(parts) == total and parts[1] == 0
    assert [share(10, weights, i) for i in range(4)] == [3, 0, 1, 6]
    assert share(5, [0, 0], 0) == 0


def test_a_shard_without_a_share_drops_the_strategies_that_read_it(tmp_path):
    strategies = [StrategySpec(name="oss_instruct", count=3), StrategySpec(name="textbook", count=40),
                  StrategySpec(name="evol_instruct"), StrategySpec(name="unit_tests", source="textbook", count=2),
                  StrategySpec(name="repair")]
    small = shard_strategies(strategies, shard_context(tmp_path, [10, 990], 0))
    assert [(s.name, s.count) for s in small] == [("repair", 0)]  # 3 and 40 items share 1%: none here
    large = shard_strategies(strategies, shard_context(tmp_path, [10, 990], 1))
    assert [(s.name, s.count) for s in large] == [("oss_instruct", 3), ("textbook", 40), ("evol_instruct", 0),
                                                  ("unit_tests", 2), ("repair", 0)]


def recipe_with(tmp_path, *stages: dict) -> str:
    seeds = tmp_path / "seeds"
    seeds.mkdir(exist_ok=True)
    (seeds / "a.py").write_text("def f():\n    return 1\n")
    raw = {"output_dir": str(tmp_path / "out"), "num_shards": 2,
           "stages": [{"stage": "ingest", "sources": [{"path": str(seeds), "license": "MIT"}]}, *stages]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


GENERATE = {"stage": "generate", "teachers": [TEACHER], "strategies": [{"name": "oss_instruct", "count": 4}]}


@pytest.mark.parametrize("stage, message", [
    ({**GENERATE, "strategies": [{"name": "oss_instrukt", "count": 1}]},
     "stages[1] (generate).strategies[0]: unknown strategy 'oss_instrukt'"),
    ({**GENERATE, "output_dir": "x"}, "stages[1] (generate): unknown field 'output_dir'"),
    ({**GENERATE, "teachers": []}, "stages[1] (generate): teachers: a run needs at least one teacher"),
    ({**GENERATE, "teachers": [{**TEACHER, "api_key_env": "NO_SUCH_KEY_VARIABLE"}]},
     "environment variable NO_SUCH_KEY_VARIABLE is not set"),
    ({**GENERATE, "validate": False, "strategies": [{"name": "oss_instruct", "count": 1}, {"name": "repair"}]},
     "'repair' needs validate: true"),
    ({**GENERATE, "sandbox": {"timeout": 3}}, "(generate): sandbox: unknown field 'timeout'; did you mean 'timeout_s'?"),
    ({"stage": "validate", "sandbox": {"memory_mb": 0}}, "(validate): SandboxConfig.memory_mb: expected a positive"),
    ({"stage": "validate", "batch_size": 0}, "(validate): batch_size must be >= 1"),
    ({"stage": "repair", "teachers": [TEACHER], "strategies": [{"name": "oss_instruct", "count": 1}]},
     "(repair): strategies: a repair stage runs exactly one strategy"),
])
def test_stage_errors_name_the_recipe_field_before_any_work(tmp_path, stage, message):
    path = recipe_with(tmp_path, stage)
    with pytest.raises(DataToolError) as excinfo:
        load_recipe(path)
    assert message in str(excinfo.value) and "recipe.yaml" in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_sample_file_sources_are_refused_in_a_stage(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"id": "s1"}\n')
    stage = {**GENERATE, "strategies": [{"name": "unit_tests", "source": str(samples)}]}
    with pytest.raises(DataToolError, match="in a pipeline every shard would repeat it"):
        load_recipe(recipe_with(tmp_path, stage))


def test_stage_configs_reuse_the_generation_config_and_are_documented():
    assert issubclass(RepairStageConfig, GenerateStageConfig) and issubclass(GenerateStageConfig, GenerationConfig)
    inherited = field_docs(GenerationConfig)
    for cls in (GenerateStageConfig, RepairStageConfig):
        assert [name for name in undocumented_fields(cls) if name not in inherited] == []
    assert undocumented_fields(ValidateStageConfig) == [] and undocumented_fields(ShardContext) == []


def sample(sample_id: str, solution: str, **extra) -> dict:
    return {"id": sample_id, "strategy": "oss_instruct", "teacher": "t", "language": "python",
            "problem": f"Write f ({sample_id}).", "solution": solution, "tests": "assert f() == 1\n",
            "test_format": "script", **extra}


RECORDS = [sample("good", "def f():\n    return 1\n"), sample("bad", "def f():\n    return 2\n"),
           sample("crash", "def f(:\n"), {"id": "doc", "text": "a seed document"},
           sample("earlier", "def f():\n    return 2\n", execution={"verdict": "pass", "note": "from generation"})]


@pytest.mark.parametrize("keep_failing", [True, False])
def test_validate_sets_execution_counts_verdicts_and_keeps_failures_for_dpo(tmp_path, keep_failing):
    counts: collections.Counter = collections.Counter()
    config = ValidateStageConfig(sandbox={"workers": 2}, keep_failing=keep_failing, batch_size=2)
    out = {r["id"]: r for r in validate_shard(config, [dict(r) for r in RECORDS], counts, shard_context(tmp_path, [1], 0))}
    assert counts["verdict.pass"] == 2 and counts["verdict.fail"] == 1 and counts["verdict.compile_error"] \
        + counts["verdict.runtime_error"] == 1
    assert counts["executed"] == 3 and counts["not_executable"] == 1  # "earlier" keeps its record
    assert out["good"]["execution"]["verdict"] == "pass" and out["earlier"]["execution"]["note"] == "from generation"
    assert "execution" not in out["doc"]
    assert ({"bad", "crash"} <= set(out)) == keep_failing and counts["dropped_failing"] == (0 if keep_failing else 2)
    revalidated = list(validate_shard(ValidateStageConfig(revalidate=True), [dict(RECORDS[-1])], counts,
                                      shard_context(tmp_path, [1], 0)))
    assert revalidated[0]["execution"]["verdict"] == "fail"  # its solution returns 2


def test_dedup_passes_failing_samples_through(tmp_path):
    passing = sample("fixed", "def f():\n    return 1\n", execution={"verdict": "pass"})
    failing = {**sample("broken", "def f():\n    return 1 + 0\n", execution={"verdict": "fail"}),
               "problem": passing["problem"]}
    copy = {**passing, "id": "copy"}
    source = str(tmp_path / "in.jsonl")
    write_records_atomic(source, [passing, failing, copy, {**failing, "id": "broken-again"}])

    def kept(config: DedupConfig) -> list[str]:
        output = str(tmp_path / "out.jsonl")
        deduplicate([source], [output], str(tmp_path / "report.json"), config,
                    lambda fn, tasks, desc: [fn(*t) for t in tasks], str(tmp_path / "work"))
        return [r["id"] for r in iter_jsonl_objects(output)]

    assert kept(DedupConfig(ngram_size=2)) == ["fixed", "broken", "broken-again"]
    assert kept(DedupConfig(ngram_size=2, keep_failing_samples=False)) == ["fixed"]
    assert os.path.isfile(tmp_path / "report.json")


def test_the_shipped_recipe_is_valid(tmp_path, monkeypatch):
    from tests.conftest import TOKENIZER

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tokenizer.model").symlink_to(TOKENIZER)  # made by the quick start in real use
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(os.path.join(repo, "recipes", "synthetic_python.yaml"))
    assert [e.id for e in recipe.stages] == ["ingest", "generate", "validate", "repair", "dedup", "decontaminate",
                                             "report", "export"]
    generate = recipe.stage("generate").config
    assert generate.teachers[0].base_url == "http://localhost:8000/v1" and not generate.validate
    assert recipe.stage("repair").config.teachers == generate.teachers

