"""Coverage report of a corpus: what it contains, what each stage kept, how long documents are.

JSON (for tools and diffs) and one self-contained HTML page with inline SVG plots. Contents:
counts by language, strategy, teacher, difficulty, concept tags, source and license; execution
verdicts; the pass rate of every earlier pipeline stage (from its done markers); the
near-duplicate and contamination rates; a histogram of document lengths in sentencepiece
tokens (or whitespace-separated words when no tokenizer is given, and labelled so).

Example::

    python -m data_tools report --input samples.jsonl --output-dir reports/ --tokenizer data/tokenizer.model
"""
from __future__ import annotations

import argparse
import bisect
import collections
import math
import os
import time
from dataclasses import dataclass, field
from html import escape
from string import Template
from typing import Sequence

from data_tools._common import DataToolError, iter_jsonl_objects, require_file, require_tokenizer, run_cli
from data_tools.pipeline.shards import STAGE_MARKER, read_json, shard_marker
from data_tools.records import execution_verdict, pretraining_document, write_json_atomic
from data_tools.svg_charts import bar_chart, histogram

PROG = "python -m data_tools report"
CATEGORIES = ("language", "strategy", "teacher", "difficulty", "concepts", "source", "license")
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "report.html")


@dataclass
class ReportConfig:
    """What the coverage report measures."""

    tokenizer: str | None = field(default=None, metadata={"path": "file"})
    """sentencepiece .model to count tokens with; without it lengths are whitespace-separated words."""
    title: str = "Synthetic data coverage report"
    """Heading of the HTML page."""
    top_concepts: int = 30
    """How many concept tags (most frequent first) the report lists."""

    def check(self) -> None:
        if self.top_concepts < 1:
            raise DataToolError(f"top_concepts must be >= 1, got {self.top_concepts}")
        if self.tokenizer and os.path.isfile(self.tokenizer):  # a missing file is reported as a missing input
            require_tokenizer(self.tokenizer, "tokenizer")


def _length_counter(tokenizer_path: str | None):
    if tokenizer_path is None:
        return lambda text: len(text.split())
    from megatron_code.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(tokenizer_path)
    return lambda text: len(tokenizer.encode(text))


def _category_values(record: dict, category: str) -> list[str]:
    value = record.get(category)
    if category == "concepts":
        return [str(v) for v in value] if isinstance(value, list) else []
    return [str(value) if value not in (None, "") else "(not set)"]


def shard_statistics(path: str, tokenizer_path: str | None) -> dict:
    """Counts and document lengths of one shard (runs in a pool worker)."""
    length_of = _length_counter(tokenizer_path)
    counts = {category: collections.Counter() for category in CATEGORIES}
    lengths, by_language, verdicts = [], collections.defaultdict(list), collections.Counter()
    for record in iter_jsonl_objects(path):
        for category in CATEGORIES:
            counts[category].update(_category_values(record, category))
        length = length_of(pretraining_document(record))
        lengths.append(length)
        by_language[str(record.get("language") or "(not set)")].append(length)
        verdicts[execution_verdict(record) or "(not executed)"] += 1
    return {"counts": counts, "lengths": lengths, "by_language": dict(by_language), "verdicts": verdicts}


def _merge(parts: list[dict]) -> dict:
    merged = {"counts": {c: collections.Counter() for c in CATEGORIES}, "lengths": [],
              "by_language": collections.defaultdict(list), "verdicts": collections.Counter()}
    for part in parts:
        for category in CATEGORIES:
            merged["counts"][category].update(part["counts"][category])
        merged["lengths"].extend(part["lengths"])
        for language, lengths in part["by_language"].items():
            merged["by_language"][language].extend(lengths)
        merged["verdicts"].update(part["verdicts"])
    return merged


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def length_summary(lengths: list[int]) -> dict:
    """Histogram over power-of-two bins (0, 16, 32, 64, ...) plus percentiles."""
    ordered = sorted(lengths)
    top = ordered[-1] if ordered else 0
    edges = [0] + [2 ** k for k in range(4, max(4, math.ceil(math.log2(top + 1))) + 1)]
    counts = [0] * (len(edges) - 1)
    for value in ordered:
        counts[min(bisect.bisect_right(edges, value) - 1, len(counts) - 1)] += 1
    return {"documents": len(ordered), "total": sum(ordered), "mean": round(sum(ordered) / max(len(ordered), 1), 1),
            "p50": _percentile(ordered, 0.5), "p90": _percentile(ordered, 0.9), "p99": _percentile(ordered, 0.99),
            "max": top, "histogram": {"edges": edges, "counts": counts}}


def _stage_counts(stage_dir: str) -> dict | None:
    """Merged counts of a stage from its markers; None if the stage has not finished."""
    stage = read_json(os.path.join(stage_dir, STAGE_MARKER))
    if stage is not None:
        return dict(stage.get("counts", {}))
    total: collections.Counter = collections.Counter()
    shard, found = 0, False
    while (marker := read_json(shard_marker(stage_dir, shard))) is not None:
        total.update(marker.get("counts", {}))
        shard, found = shard + 1, True
    return dict(total) if found else None


def stage_statistics(stages: Sequence[tuple[str, str, str]]) -> list[dict]:
    """Per earlier stage: input, output and pass rate.

    The pass rate is output/input, except for stages that count execution verdicts
    (``verdict.<name>`` keys, as the validate stage does), where it is the share of ``pass``.
    """
    rows = []
    for stage_id, stage_type, directory in stages:
        counts = _stage_counts(directory)
        if counts is None:
            continue
        verdicts = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("verdict.")}
        if verdicts:
            rate = verdicts.get("pass", 0) / max(sum(verdicts.values()), 1)
        else:
            rate = counts["output"] / counts["input"] if counts.get("input") else None
        rows.append({"stage": stage_id, "type": stage_type, "input": counts.get("input"), "output": counts.get("output"),
                     "pass_rate": None if rate is None else round(rate, 4), "verdicts": verdicts, "counts": counts})
    return rows


def _rate(stages: list[dict], stage_type: str, key: str) -> float | None:
    for row in stages:
        if row["type"] == stage_type and row["input"]:
            return round(row["counts"].get(key, 0) / row["input"], 4)
    return None


def build_report(inputs: Sequence[str], config: ReportConfig, earlier_stages: Sequence[tuple[str, str, str]],
                 pool_map) -> dict:
    """The report dict (see module doc); ``pool_map(fn, tasks, desc)`` parallelizes over input shards."""
    merged = _merge(pool_map(shard_statistics, [(path, config.tokenizer) for path in inputs], "report"))
    stages = stage_statistics(earlier_stages)
    unit = (f"sentencepiece tokens ({os.path.basename(config.tokenizer)})" if config.tokenizer
            else "whitespace-separated words (no tokenizer given)")
    counts = {c: dict(merged["counts"][c].most_common()) for c in CATEGORIES}
    counts["concepts"] = dict(merged["counts"]["concepts"].most_common(config.top_concepts))
    return {
        "title": config.title, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "documents": len(merged["lengths"]),
        "counts": counts, "verdicts": dict(merged["verdicts"].most_common()),
        "length_unit": unit, "lengths": length_summary(merged["lengths"]),
        "lengths_by_language": {lang: {k: v for k, v in length_summary(values).items() if k != "histogram"}
                                for lang, values in sorted(merged["by_language"].items())},
        "stages": stages,
        "exact_duplicate_rate": _rate(stages, "dedup", "exact_duplicate"),
        "near_duplicate_rate": _rate(stages, "dedup", "near_duplicate"),
        "contamination_rate": _rate(stages, "decontaminate", "contaminated"),
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence], numeric_from: int = 1) -> str:
    head = "".join(f'<th class="{"num" if i >= numeric_from else ""}">{escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i >= numeric_from else ""}">{escape(_cell(v))}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _pct(rate: float | None) -> str | None:
    return None if rate is None else f"{rate:.2%}"


def render_html(report: dict) -> str:
    """The report as one HTML page (template: data_tools/templates/report.html)."""
    lengths = report["lengths"]
    sections = [
        "<h2>Summary</h2>" + _table(["", "value"], [
            ("documents", report["documents"]), (f"total length ({report['length_unit']})", lengths["total"]),
            ("exact-duplicate rate", _pct(report["exact_duplicate_rate"])),
            ("near-duplicate rate", _pct(report["near_duplicate_rate"])),
            ("contamination rate", _pct(report["contamination_rate"]))]),
        "<h2>Pipeline stages</h2>" + _table(["stage", "type", "input", "output", "pass rate"], [
            (r["stage"], r["type"], r["input"], r["output"], _pct(r["pass_rate"])) for r in report["stages"]], numeric_from=2)
        + bar_chart([(r["stage"], r["pass_rate"]) for r in report["stages"] if r["pass_rate"] is not None],
                    "pass rate per stage", value_format=lambda v: f"{v:.1%}", maximum=1.0),
        "<h2>Document length</h2>" + histogram(lengths["histogram"]["edges"], lengths["histogram"]["counts"],
                                               "documents by length", report["length_unit"])
        + _table(["language", "documents", "mean", "p50", "p90", "max"], [
            (lang, s["documents"], s["mean"], s["p50"], s["p90"], s["max"]) for lang, s in report["lengths_by_language"].items()]),
        "<h2>Coverage</h2>" + "".join(bar_chart(list(report["counts"][c].items()), f"documents by {c}")
                                      for c in CATEGORIES if set(report["counts"][c]) - {"(not set)"})
        + bar_chart(list(report["verdicts"].items()), "execution verdicts"),
    ]
    with open(TEMPLATE, encoding="utf-8") as f:
        template = Template(f.read())
    return template.substitute(title=escape(report["title"]), generated=escape(report["created"]), body="\n".join(sections))


def write_report(report: dict, json_path: str, html_path: str) -> None:
    from data_tools._common import atomic_outputs

    write_json_atomic(json_path, report)
    with atomic_outputs([html_path]) as (tmp,), open(tmp, "w", encoding="utf-8") as f:
        f.write(render_html(report))


def stages_of_run(run_dir: str) -> list[tuple[str, str, str]]:
    """``(stage id, type, directory)`` of a pipeline output directory's stages, in order."""
    found = []
    for name in sorted(os.listdir(run_dir)):
        directory = os.path.join(run_dir, name)
        marker = read_json(os.path.join(directory, STAGE_MARKER)) or read_json(shard_marker(directory, 0))
        if os.path.isdir(directory) and marker is not None:
            found.append((marker["stage"], marker["type"], directory))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl files (seed documents or samples)")
    parser.add_argument("--output-dir", required=True, help="writes report.json and report.html here")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model to measure lengths in tokens")
    parser.add_argument("--run-dir", default=None,
                        help="a pipeline output_dir: adds its stages' pass rates, dedup and contamination rates")
    parser.add_argument("--title", default=ReportConfig.title, help="page heading")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        for path in args.input:
            require_file(path, "--input", "pass jsonl files")
        if args.tokenizer:
            require_file(args.tokenizer, "--tokenizer", "pass a sentencepiece .model")
        if args.run_dir and not os.path.isdir(args.run_dir):
            raise DataToolError(f"--run-dir {args.run_dir!r} is not a directory; pass a recipe's output_dir")
        config = ReportConfig(tokenizer=args.tokenizer, title=args.title)
        stages = stages_of_run(args.run_dir) if args.run_dir else []
        report = build_report(args.input, config, stages, lambda fn, tasks, desc: [fn(*t) for t in tasks])
        json_path, html_path = (os.path.join(args.output_dir, f"report.{ext}") for ext in ("json", "html"))
        write_report(report, json_path, html_path)
        print(f"{report['documents']:,} documents; wrote {json_path} and {html_path}")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
