"""``python -m data_tools ingest``: read seed sources into one jsonl of seed documents.

Examples::

    python -m data_tools ingest --source ~/src/requests --output seeds.jsonl
    python -m data_tools ingest --source vendor/lib --license MIT --source corpus.jsonl --output seeds.jsonl
    python -m data_tools ingest --config ingest.yaml --output seeds.jsonl   # every IngestConfig field

The summary line counts the files kept and every file dropped, by reason.
"""
from __future__ import annotations

import argparse
import collections
from typing import Sequence

from data_tools._common import DataToolError, check_outputs_free, read_yaml_file, run_cli
from data_tools.ingest.core import IngestConfig, ingest_entries, plan_ingest
from data_tools.pipeline.config_loader import check_input_paths, from_dict
from data_tools.records import write_records_atomic

PROG = "python -m data_tools ingest"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--source", action="append", default=[], metavar="PATH",
                        help="directory, git checkout, file or .jsonl (repeatable)")
    parser.add_argument("--license", action="append", default=[], metavar="SPDX",
                        help="declared license of the --source before it (repeatable, in order)")
    parser.add_argument("--config", default=None, help="YAML mapping of IngestConfig fields (sources, quality, license, languages)")
    parser.add_argument("--languages", nargs="+", default=None, help="languages to keep (default: the schema's eight)")
    parser.add_argument("--output", required=True, help="jsonl of seed documents")
    parser.add_argument("--overwrite", action="store_true", help="replace --output")
    return parser


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    raw = (read_yaml_file(args.config, "--config") or {}) if args.config else {}
    if not isinstance(raw, dict):
        raise DataToolError(f"--config {args.config!r} must be a mapping of IngestConfig fields")
    if len(args.license) > len(args.source):
        raise DataToolError(f"{len(args.license)} --license for {len(args.source)} --source; give each --license after its --source")
    licenses = args.license + [None] * (len(args.source) - len(args.license))
    sources = list(raw.get("sources", [])) + [{"path": p, "license": lic} for p, lic in zip(args.source, licenses)]
    raw = {**raw, "sources": sources}
    if args.languages:
        raw["languages"] = args.languages
    config = from_dict(IngestConfig, raw, args.config or "ingest options")
    check_input_paths(config, "ingest")
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        config = config_from_args(args)
        check_outputs_free([args.output], args.overwrite, "--output")
        entries = plan_ingest(config)
        counts: collections.Counter = collections.Counter()
        written = write_records_atomic(args.output, ingest_entries(config, entries, counts))
        dropped = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(counts.items()) if k.startswith("dropped."))
        print(f"kept {written['records']:,} of {len(entries):,} files -> {args.output}; dropped: {dropped or 'none'}")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
