"""Generation strategies, the runner and crash safety, against a scripted teacher over loopback HTTP.

Samples are validated by the real sandbox (data_tools.sandbox.validate_samples); the only
test double is the teacher server (tests/openai_test_server.py), which answers each
strategy's template with a small correct Python problem, or a wrong one on request.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from data_tools._common import DataToolError
from data_tools.generate import GenerationConfig, StrategySpec, generate
from data_tools.generate.journal import ACCEPTED, REJECTED, SampleJournal
from data_tools.generate.reply_sections import split_sections
from data_tools.generate.strategies.humaneval_style import parse_humaneval_reply
from data_tools.generate.strategies.livecodebench_style import parse_livecodebench_reply
from data_tools.generate.strategies.problem_reply import parse_problem_reply
from data_tools.generate.strategies.repair import parse_repair_reply
from data_tools.generate.strategies.textbook import parse_textbook_reply
from data_tools.generate.strategies.unit_tests import parse_tests_reply
from data_tools.generate.templates import LANGUAGES, conventions_for_tests, evol_mutations
from data_tools.generate.validation import sandbox_validator
from data_tools.generate.work import choose_teacher
from data_tools.records import stable_id
from data_tools.teacher import ReplyRejected, TeacherConfig, TeacherError
from megatron_code.config_docs import undocumented_fields
from tests.openai_test_server import ScriptedTeacherServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_KEYS = {"id", "strategy", "teacher", "language", "seed_id", "problem", "solution", "tests", "test_format",
               "io_examples", "entry_point", "difficulty", "concepts", "evol_round", "parent_id", "teacher_meta"}


@pytest.fixture(scope="module")
def validator():
    return sandbox_validator({"workers": 2, "timeout_s": 10.0}, ["python"])


@pytest.fixture
def server():
    with ScriptedTeacherServer(models=["teacher-m"]) as srv:
        yield srv


@pytest.fixture
def seeds_path(tmp_path) -> str:
    path = tmp_path / "seeds.jsonl"
    with open(path, "w") as f:
        for i in range(4):
            text = f"import math\n\n\ndef area_{i}(r):\n    return math.pi * r ** {i + 1}\n"
            f.write(json.dumps({"id": f"seed-{i}", "text": text, "language": "python", "source": "demo",
                                "licenses": ["MIT"], "license": "MIT"}) + "\n")
    return str(path)


def recipe(server: ScriptedTeacherServer, seeds_path: str, output_dir: str, strategies: list[dict], **extra) -> dict:
    teacher = {"name": "t1", "base_url": server.base_url, "model": "teacher-m", "max_concurrency": 4,
               "backoff_base_s": 0.001, "backoff_max_s": 0.05}
    return {"teachers": [teacher], "strategies": strategies, "seeds_path": seeds_path, "output_dir": output_dir,
            "seed": 11, **extra}


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


# -- parsers -------------------------------------------------------------------------------------

GOOD_PROBLEM = """Sure! Here it is.

## Problem
Write `double(xs)` that returns a list with every element of `xs` doubled.

## Solution
```python
def double(xs):
    # Tests
    return [2 * x for x in xs]
```

## Tests
```python
assert double([1, 2]) == [2, 4]
assert double([]) == []
```

## Difficulty
Easy.

## Concepts
- list comprehensions
- `lists`
"""


def test_problem_parser_accepts_fenced_wrapped_and_loose_formats():
    parsed = parse_problem_reply(GOOD_PROBLEM, "python")
    assert parsed["solution"].startswith("def double(xs):\n    # Tests\n"), "a comment must not start a section"
    assert parsed["tests"] == "assert double([1, 2]) == [2, 4]\nassert double([]) == []\n"
    assert parsed["difficulty"] == "easy" and parsed["concepts"] == ["list comprehensions", "lists"]
    wrapped = "```markdown\n" + GOOD_PROBLEM.split("\n", 2)[2] + "```\n"
    assert parse_problem_reply(wrapped, "python")["solution"] == parsed["solution"]
    loose = GOOD_PROBLEM.replace("## Problem", "**Problem:**").replace("## Solution", "Solution:") \
        .replace("## Tests", "[Tests]").replace("## Difficulty\nEasy.", "**Difficulty:** hard")
    assert parse_problem_reply(loose, "python")["difficulty"] == "hard"
    unfenced = ("## Problem\nReturn the sum of a and b, as an integer.\n"
                "## Solution\ndef add(a, b):\n    return a + b\n## Tests\nassert add(1, 2) == 3\n")
    assert parse_problem_reply(unfenced, "python")["solution"] == "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("mutate, reason", [
    (lambda t: t.split("## Tests")[0], "lacks the section(s) Tests"),
    (lambda t: t.replace("return [2 * x for x in xs]", "return [2 * x for x in xs"), "solution is not valid Python"),
    (lambda t: t.replace("assert double([1, 2]) == [2, 4]\nassert double([]) == []", "double([1])"),
     "tests check nothing"),
    (lambda t: t.replace("assert double([]) == []\n```", "assert double([]) == []\n"), "not closed"),
    (lambda t: "I cannot help with that.", "lacks the section(s) Problem, Solution, Tests"),
])
def test_problem_parser_rejects_with_a_reason(mutate, reason):
    with pytest.raises(ReplyRejected, match=re.escape(reason)):
        parse_problem_reply(mutate(GOOD_PROBLEM), "python")


def test_problem_parser_leaves_other_languages_to_their_compilers():
    reply = GOOD_PROBLEM.replace("```python", "```c").replace("return [2 * x for x in xs]", "return x;")
    assert parse_problem_reply(reply, "c")["solution"].endswith("return x;\n")


GOOD_HUMANEVAL = '''## Prompt
```python
def add(a: int, b: int) -> int:
    """Add two numbers.
    >>> add(1, 2)
    3
    """
```

## Solution
```python
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b
```

## Tests
```python
def check(candidate):
    assert candidate(1, 2) == 3
```

## Entry Point: `add`
'''


def test_humaneval_parser():
    parsed = parse_humaneval_reply(GOOD_HUMANEVAL)
    assert parsed["entry_point"] == "add" and parsed["problem"].startswith("def add(a: int")
    assert parsed["tests"].endswith("\ncheck(add)\n")
    with pytest.raises(ReplyRejected, match="with a docstring"):
        docstring = '    """Add two numbers.\n    >>> add(1, 2)\n    3\n    """\n'
        parse_humaneval_reply(GOOD_HUMANEVAL.replace(docstring, "    pass\n"))
    with pytest.raises(ReplyRejected, match="does not define the entry point"):
        parse_humaneval_reply(GOOD_HUMANEVAL.replace('def add(a: int, b: int) -> int:\n    """Add two numbers."""',
                                                     'def plus(a: int, b: int) -> int:\n    """Add two numbers."""'))
    with pytest.raises(ReplyRejected, match="check\\(candidate\\)"):
        parse_humaneval_reply(GOOD_HUMANEVAL.replace("def check(candidate)", "def verify(candidate)"))


GOOD_LCB = """## Problem
Read two integers and print their sum.

## Solution
```python
a, b = map(int, input().split())
print(a + b)
```

## Examples
```json
[{"input": "1 2\\n", "output": "3\\n"}, {"input": "0 0\\n", "output": "0\\n"}]
```
"""


def test_livecodebench_parser():
    parsed = parse_livecodebench_reply(GOOD_LCB, "python")
    assert parsed["test_format"] == "stdin_stdout" and parsed["tests"] == ""
    assert parsed["io_examples"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "0 0\n", "output": "0\n"}]
    with pytest.raises(ReplyRejected, match="not valid JSON"):
        parse_livecodebench_reply(GOOD_LCB.replace('"0\\n"}]', '"0\\n"'), "python")
    with pytest.raises(ReplyRejected, match="non-empty JSON list"):
        parse_livecodebench_reply(GOOD_LCB.split("```json")[0] + "```json\n[]\n```\n", "python")
    with pytest.raises(ReplyRejected, match="example 0 must be an object"):
        parse_livecodebench_reply(GOOD_LCB.replace('"output": "3\\n"', '"output": 3'), "python")


def test_textbook_unit_tests_and_repair_parsers():
    document = "# Recursion\n\n" + "A function may call itself. " * 15 + "\n\n```python\ndef f(n):\n    return n\n```\n"
    assert parse_textbook_reply("```markdown\n" + document + "```")["text"] == document
    with pytest.raises(ReplyRejected, match="too short"):
        parse_textbook_reply("# Title\n\n```python\nx = 1\n```\n")
    with pytest.raises(ReplyRejected, match="no fenced code example"):
        parse_textbook_reply(document.split("```")[0])
    assert parse_tests_reply("## Tests\n```python\nassert f(1) == 1\n```", "def f(n):\n    return n\n", "python") \
        == "assert f(1) == 1\n"
    with pytest.raises(ReplyRejected, match="tests check nothing"):
        parse_tests_reply("## Tests\n```python\nf(1)\n```", "def f(n):\n    return n\n", "python")
    assert parse_repair_reply("**Solution:**\n```python\ndef f(n):\n    return n\n```\n", "python")["solution"] \
        == "def f(n):\n    return n\n"
    with pytest.raises(ReplyRejected, match="lacks the section"):
        parse_repair_reply("The bug is on line 2.", "python")


def test_every_language_has_test_conventions_and_every_mutation_an_instruction():
    assert all(len(conventions_for_tests(language)) > 40 for language in LANGUAGES)
    assert list(evol_mutations()) == ["add_constraints", "rarer_requirement", "more_reasoning", "misdirection",
                                      "higher_complexity"]
    assert all(len(text) > 40 for text in evol_mutations().values())


def test_markdown_headings_take_precedence_over_loose_ones():
    reply = "## Problem\nCount words.\nExamples\none two -> 2\n\n## Examples\n```json\n[]\n```\n"
    sections = split_sections(reply, ("Problem", "Examples"))
    assert "one two -> 2" in sections["Problem"] and sections["Examples"].startswith("```json")


# -- runs against the scripted teacher -----------------------------------------------------------

def test_every_strategy_end_to_end_and_rerun_is_free(server, seeds_path, tmp_path, validator):
    strategies = [{"name": "oss_instruct", "count": 3}, {"name": "humaneval_style", "count": 2},
                  {"name": "livecodebench_style", "count": 2}, {"name": "textbook", "count": 1},
                  {"name": "evol_instruct", "rounds": 2}, {"name": "unit_tests", "source": "oss_instruct", "count": 2}]
    config = GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path / "out"), strategies))
    summary = generate(config, validator=validator)
    samples = read_jsonl(str(tmp_path / "out" / "samples.jsonl"))
    by_strategy = collections.Counter(s["strategy"] for s in samples)
    assert by_strategy == {"oss_instruct": 3, "humaneval_style": 2, "livecodebench_style": 2, "textbook": 1,
                           "evol_instruct": 6, "unit_tests": 2}
    for sample in samples:
        assert sample["teacher"] == "t1" and sample["teacher_meta"]["system_fingerprint"] == "fp_test_1"
        assert sample["teacher_meta"]["usage"]["total_tokens"] > 0 and sample["teacher_meta"]["cached"] is False
        if sample["strategy"] == "textbook":
            assert "```python" in sample["text"] and "problem" not in sample
            continue
        assert SCHEMA_KEYS <= set(sample) and sample["execution"]["verdict"] == "pass"
    ids = {s["id"]: s for s in samples}
    for evolved in (s for s in samples if s["strategy"] == "evol_instruct"):
        parent = ids[evolved["parent_id"]]
        assert evolved["evol_round"] == parent["evol_round"] + 1 and evolved["seed_id"] == parent["seed_id"]
    lcb = next(s for s in samples if s["strategy"] == "livecodebench_style")
    assert lcb["test_format"] == "stdin_stdout" and lcb["io_examples"]
    assert summary.counts["oss_instruct"]["accepted"] == 3

    before, requests = open(tmp_path / "out" / "samples.jsonl", "rb").read(), server.counts["chat"]
    again = generate(config, validator=validator)
    assert server.counts["chat"] == requests, "a finished run must cost nothing to rerun"
    assert open(tmp_path / "out" / "samples.jsonl", "rb").read() == before
    assert again.counts["evol_instruct"]["done_before"] == 6


def test_evol_discards_a_failing_evolution_and_stops_its_lineage(server, seeds_path, tmp_path, validator):
    server.wrong_solutions = {"evol_instruct:2"}
    strategies = [{"name": "oss_instruct", "count": 2}, {"name": "evol_instruct", "rounds": 3}]
    generate(GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path), strategies)), validator=validator)
    accepted = [s for s in read_jsonl(str(tmp_path / "samples.jsonl")) if s["strategy"] == "evol_instruct"]
    rejected = read_jsonl(str(tmp_path / "rejected.jsonl"))
    assert sorted(s["evol_round"] for s in accepted) == [1, 1]
    assert sorted(r["evol_round"] for r in rejected) == [2, 2]
    assert all(r["rejection"] == {"stage": "validation", "reason": "verdict fail"} for r in rejected)
    assert all(r["execution"]["verdict"] == "fail" for r in rejected)
    assert server.chat_count("evol_instruct") == 4, "no round 3 may be asked after round 2 failed"
    assert {r["parent_id"] for r in rejected} == {s["id"] for s in accepted}


def test_repair_fixes_failing_samples_within_bounds(server, seeds_path, tmp_path, validator):
    server.wrong_solutions = {"oss_instruct"}
    strategies = [{"name": "oss_instruct", "count": 2}, {"name": "repair", "rounds": 3}]
    generate(GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path), strategies)), validator=validator)
    failures = {r["id"]: r for r in read_jsonl(str(tmp_path / "rejected.jsonl"))}
    repaired = read_jsonl(str(tmp_path / "samples.jsonl"))
    assert len(failures) == 2 and len(repaired) == 2
    for sample in repaired:
        parent = failures[sample["parent_id"]]
        assert sample["strategy"] == "repair" and sample["execution"]["verdict"] == "pass"
        assert sample["tests"] == parent["tests"] and sample["solution"] != parent["solution"]
        assert [h["verdict"] for h in sample["repair_history"]] == ["fail", "pass"]
        assert "AssertionError" in sample["repair_history"][0]["stderr_excerpt"]
    assert server.chat_count("repair") == 2
    feedback = next(b for b in server.requests if "Task: repair" in b["messages"][1]["content"])
    assert "verdict: fail" in feedback["messages"][1]["content"] and "+ 1" in feedback["messages"][1]["content"]


def test_repair_gives_up_after_its_rounds(server, seeds_path, tmp_path, validator):
    server.wrong_solutions = {"oss_instruct", "repair"}
    strategies = [{"name": "oss_instruct", "count": 1}, {"name": "repair", "rounds": 2}]
    summary = generate(GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path), strategies)),
                       validator=validator)
    assert read_jsonl(str(tmp_path / "samples.jsonl")) == []
    gave_up = [r for r in read_jsonl(str(tmp_path / "rejected.jsonl")) if r["strategy"] == "repair"]
    assert len(gave_up) == 1 and [h["round"] for h in gave_up[0]["repair_history"]] == [0, 1, 2]
    assert gave_up[0]["rejection"]["reason"] == "still failing after 2 repair rounds"
    assert server.chat_count("repair") == 2 and summary.counts["repair"]["rejected_validation"] == 1


def test_sample_strategy_reads_a_samples_file(server, seeds_path, tmp_path, validator):
    first = recipe(server, seeds_path, str(tmp_path / "a"), [{"name": "oss_instruct", "count": 1}])
    generate(GenerationConfig.from_dict(first), validator=validator)
    source = str(tmp_path / "a" / "samples.jsonl")
    second = recipe(server, seeds_path, str(tmp_path / "b"), [{"name": "unit_tests", "source": source}])
    generate(GenerationConfig.from_dict(second), validator=validator)
    (original,), (tested,) = read_jsonl(source), read_jsonl(str(tmp_path / "b" / "samples.jsonl"))
    assert tested["strategy"] == "unit_tests" and tested["parent_id"] == original["id"]
    assert tested["solution"] == original["solution"] and tested["seed_id"] == "seed-0"
    assert tested["execution"]["verdict"] == "pass"


def test_unparseable_replies_are_recorded_not_lost(server, seeds_path, tmp_path):
    server.push("unparseable", "unparseable", "unparseable")
    config = GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path), [{"name": "textbook", "count": 1}]))
    generate(config)  # textbook documents are not executed: no validator needed
    (rejected,) = read_jsonl(str(tmp_path / "rejected.jsonl"))
    assert rejected["rejection"]["stage"] == "parse" and "too short" in rejected["rejection"]["reason"]


def test_teacher_weights_are_respected(tmp_path, seeds_path):
    names = [TeacherConfig(name=n, base_url="http://h:1/v1", model=n, weight=w) for n, w in (("big", 3), ("small", 1))]
    draws = collections.Counter(choose_teacher(5, f"oss_instruct/seed/{i}", names) for i in range(4000))
    assert 0.72 < draws["big"] / 4000 < 0.78
    first = [choose_teacher(5, f"k{i}", names) for i in range(50)]
    assert first == [choose_teacher(5, f"k{i}", names) for i in range(50)], "draws must be reproducible"

    with ScriptedTeacherServer(models=["big-m", "small-m"]) as srv:
        teachers = [{"name": "big", "base_url": srv.base_url, "model": "big-m", "weight": 3.0},
                    {"name": "small", "base_url": srv.base_url, "model": "small-m", "weight": 1.0}]
        config = GenerationConfig.from_dict({"teachers": teachers, "strategies": [{"name": "textbook", "count": 40}],
                                             "seeds_path": seeds_path, "output_dir": str(tmp_path), "seed": 5})
        generate(config)
    samples = read_jsonl(str(tmp_path / "samples.jsonl"))
    seed_ids = [json.loads(line)["id"] for line in open(seeds_path)]
    expected = set()
    for i in range(40):  # the run's items: seeds cycled in file order, each teacher drawn by weight
        seed_id, index = seed_ids[i % len(seed_ids)], i // len(seed_ids)
        teacher = choose_teacher(5, f"textbook/{seed_id}/{index}", config.teachers)
        expected.add(stable_id("textbook", seed_id, teacher, "0", str(index)))
    assert {s["id"] for s in samples} == expected and len(samples) == 40
    assert all(s["teacher_meta"]["model"] == f"{s['teacher']}-m" for s in samples)
    counts = collections.Counter(s["teacher"] for s in samples)
    assert counts["big"] > counts["small"] > 0


def test_journal_drops_a_torn_line_and_refuses_duplicates_and_a_second_writer(tmp_path):
    with SampleJournal(str(tmp_path)) as journal:
        journal.append(ACCEPTED, {"id": "a", "x": 1})
        journal.append(REJECTED, {"id": "b"})
        with pytest.raises(RuntimeError, match="already in"):
            journal.append(REJECTED, {"id": "a"})
        with pytest.raises(DataToolError, match="another generation run is writing"):
            SampleJournal(str(tmp_path))
    with open(tmp_path / "samples.jsonl", "ab") as f:
        f.write(b'{"id": "c", "x": ')  # a write cut short by kill -9
    with SampleJournal(str(tmp_path)) as journal:
        assert journal.dropped_torn_lines == 1 and journal.status("c") is None
        assert journal.get("a") == {"id": "a", "x": 1} and journal.status("b") == REJECTED
        journal.append(ACCEPTED, {"id": "c", "x": 3})
    assert [r["id"] for r in read_jsonl(str(tmp_path / "samples.jsonl"))] == ["a", "c"]
    with open(tmp_path / "samples.jsonl", "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(DataToolError, match=r"samples.jsonl:3: not a generation record"):
        SampleJournal(str(tmp_path))


def test_kill_9_mid_generation_then_rerun_loses_and_duplicates_nothing(server, seeds_path, tmp_path, validator):
    strategies = [{"name": "oss_instruct", "count": 8}, {"name": "evol_instruct", "rounds": 1}]
    reference = GenerationConfig.from_dict(recipe(server, seeds_path, str(tmp_path / "reference"), strategies))
    generate(reference, validator=validator)
    expected = {s["id"]: s for s in read_jsonl(str(tmp_path / "reference" / "samples.jsonl"))}
    assert len(expected) == 16
    reference_requests = server.counts["chat"]

    server.delay_s = 0.1  # slow enough to be caught mid-run
    out = tmp_path / "interrupted"
    recipe_path = tmp_path / "recipe.json"
    values = recipe(server, seeds_path, str(out), strategies, sandbox={"workers": 2})
    values["teachers"][0]["max_concurrency"] = 2
    recipe_path.write_text(json.dumps(values))
    command = [sys.executable, "-m", "data_tools.generate", "--config", str(recipe_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(read_jsonl(str(out / "samples.jsonl"))) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    written = read_jsonl(str(out / "samples.jsonl"))
    assert 4 <= len(written) < 16, "the kill must land mid-run"
    with open(out / "samples.jsonl", "ab") as f:
        f.write(b'{"id": "torn-by-the-kill", "strategy": "oss_')  # what a kill during write() leaves

    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dropped 1 torn line" in done.stdout
    ids = [s["id"] for s in read_jsonl(str(out / "samples.jsonl"))]
    assert len(ids) == len(set(ids)), "no sample may be written twice"
    assert set(ids) == set(expected), "the resumed run must produce exactly the uninterrupted run's samples"
    for sample in read_jsonl(str(out / "samples.jsonl")):
        assert sample["solution"] == expected[sample["id"]]["solution"]
    # Only requests in flight at the kill are asked again; the cache answers the rest.
    assert server.counts["chat"] - reference_requests <= 16 + 2


# -- configuration and command line --------------------------------------------------------------

def test_recipe_errors_are_clear_and_come_before_any_work(server, seeds_path, tmp_path):
    base = recipe(server, seeds_path, str(tmp_path / "out"), [{"name": "oss_instruct", "count": 1}])
    cases = [
        ({"strategies": [{"name": "oss_instrukt", "count": 1}]}, "unknown strategy 'oss_instrukt'"),
        ({"strategies": [{"name": "oss_instruct", "count": 1, "round": 2}]},
         "unknown field 'round'; did you mean 'rounds'"),
        ({"strategies": [{"name": "oss_instruct", "count": 0}]}, "count must be > 0"),
        ({"strategies": [{"name": "unit_tests", "source": "oss_instruct"}]}, "neither an earlier strategy"),
        ({"seeds_path": None}, "needs seed documents"),
        ({"languages": ["cobol"]}, "not supported"),
        ({"output_dir": ""}, "output_dir is not set"),
        ({"strategies": [{"name": "evol_instruct", "mutations": ["harder"]}]}, "unknown mutations"),
    ]
    for change, message in cases:
        with pytest.raises(DataToolError, match=message):
            GenerationConfig.from_dict({**base, **change})
    missing = GenerationConfig.from_dict({**base, "seeds_path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataToolError, match="seeds_path .* does not exist"):
        generate(missing)
    bad_seeds = tmp_path / "bad_seeds.jsonl"
    bad_seeds.write_text('{"id": "s0", "text": "x = 1"}\n{"id": "s1", "path": "a.py"}\n')
    with pytest.raises(DataToolError, match=r"bad_seeds.jsonl:2: a seed document needs a non-empty string field 'text'"):
        generate(GenerationConfig.from_dict({**base, "seeds_path": str(bad_seeds)}))
    no_validation = GenerationConfig.from_dict({**base, "validate": False,
                                                "strategies": base["strategies"] + [{"name": "repair"}]})
    with pytest.raises(DataToolError, match="'repair' needs validate: true"):
        generate(no_validation)
    assert server.counts["chat"] == 0 and not os.path.exists(tmp_path / "out")
    assert undocumented_fields(GenerationConfig) == [] and undocumented_fields(StrategySpec) == []


def test_unreachable_teacher_stops_the_run_before_any_output(seeds_path, tmp_path):
    config = GenerationConfig.from_dict({
        "teachers": [{"name": "gone", "base_url": "http://127.0.0.1:9/v1", "model": "m"}],
        "strategies": [{"name": "textbook", "count": 1}], "seeds_path": seeds_path, "output_dir": str(tmp_path / "o")})
    with pytest.raises(TeacherError, match="teacher 'gone': cannot reach base_url http://127.0.0.1:9/v1"):
        generate(config)
    assert not os.path.exists(tmp_path / "o")


def test_cli_check_and_one_line_errors(server, seeds_path, tmp_path, capsys):
    from data_tools.generate import main

    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe(server, seeds_path, str(tmp_path / "out"), [{"name": "textbook", "count": 1}])))
    main(["--config", str(path), "--check", "--no-validate"])
    assert "1 teacher(s) are ready" in capsys.readouterr().out
    assert server.counts["models"] == 1 and server.counts["chat"] == 0
    with pytest.raises(SystemExit) as excinfo:
        main(["--config", str(tmp_path / "missing.yaml")])
    assert excinfo.value.code.startswith("python -m data_tools.generate: error: --config")
