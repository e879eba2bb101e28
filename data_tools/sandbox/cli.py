"""``python -m data_tools.sandbox``: validate a jsonl file of samples, or list the toolchains.

    python -m data_tools.sandbox --input samples.jsonl --output validated.jsonl [--workers N]
        [--timeout-s S] [--keep failed|passed|all]
    python -m data_tools.sandbox --list-toolchains

Every output line is the input sample plus an ``execution`` field (ExecutionResult.to_dict()); a
table of verdict counts per language follows on stdout. See docs/sandbox.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from typing import Sequence

from data_tools._common import (DataToolError, atomic_outputs, check_outputs_free, iter_jsonl_objects,
                                parse_json_object, require_file, run_cli)
from data_tools.sandbox.config import LANGUAGES, VERDICTS, SandboxConfig
from data_tools.sandbox.isolation import plan_isolation
from data_tools.sandbox.toolchains import INSTALL_HINTS, detect_toolchains
from data_tools.sandbox.validate import check_sample, iter_validated, missing_toolchains, tqdm_disable

PROG = "python -m data_tools.sandbox"
KEEP = {"all": lambda verdict: True, "passed": lambda verdict: verdict == "pass",
        "failed": lambda verdict: verdict != "pass"}


def check_input(path: str) -> tuple[int, collections.Counter]:
    """Check every sample of ``path`` before any runs; return (sample count, samples per language)."""
    require_file(path, "--input", "pass the .jsonl file of generated samples")
    languages = collections.Counter()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            sample = parse_json_object(raw, path, lineno)
            if sample is not None:
                check_sample(sample, f"{path}:{lineno}")
                languages[sample["language"]] += 1
    if not languages:
        raise DataToolError(f"--input {path!r} holds no samples; expected one JSON object per line")
    return sum(languages.values()), languages


def validate_file(input_path: str, output_path: str, config: SandboxConfig, keep: str = "all",
                  overwrite: bool = False) -> collections.Counter:
    """Validate every sample of ``input_path`` into ``output_path`` (written atomically); return the
    count of samples per (language, verdict)."""
    check_outputs_free([output_path], overwrite, "--output")
    total, languages = check_input(input_path)
    plan = plan_isolation(config)
    if plan.error:
        raise DataToolError(plan.error)
    print(f"{PROG}: isolation: {plan.description}", file=sys.stderr)
    for language, count in missing_toolchains(languages.elements()).items():
        print(f"{PROG}: WARNING: {count} {language} sample(s) will get verdict sandbox_error: "
              f"no {language} toolchain; {INSTALL_HINTS[language]}", file=sys.stderr)
    from tqdm import tqdm

    counts = collections.Counter()
    with atomic_outputs([output_path]) as (tmp_path,), open(tmp_path, "w", encoding="utf-8") as out, \
            tqdm(total=total, desc="sandbox", unit="sample", disable=tqdm_disable(config.progress)) as bar:
        samples = iter_jsonl_objects(input_path)
        originals = iter_jsonl_objects(input_path)  # a second reader keeps memory flat: samples stream by
        for sample, result in zip(originals, iter_validated(samples, config, bar)):
            counts[sample["language"], result.verdict] += 1
            if KEEP[keep](result.verdict):
                out.write(json.dumps({**sample, "execution": result.to_dict()}, ensure_ascii=False) + "\n")
    return counts


def summary_table(counts: collections.Counter) -> str:
    """Verdict counts per language (rows) and in total, as an aligned text table."""
    languages = [language for language in LANGUAGES if any(counts[language, v] for v in VERDICTS)]
    header = ["language", *VERDICTS, "total"]
    rows = [[language, *(counts[language, v] for v in VERDICTS), sum(counts[language, v] for v in VERDICTS)]
            for language in languages]
    rows.append(["total", *(sum(row[i + 1] for row in rows) for i in range(len(VERDICTS) + 1))])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)


def toolchain_table() -> str:
    lines = []
    for language, toolchain in detect_toolchains().items():
        if toolchain is None:
            lines.append(f"{language:<11} MISSING  {INSTALL_HINTS[language]}")
        else:
            programs = ", ".join(toolchain.programs.values())
            lines.append(f"{language:<11} ok       {toolchain.version}  ({programs})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run generated samples (solution + tests, or "
                                     "stdin/stdout examples) in the sandbox and record a verdict per sample.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", help="jsonl file of samples (docs/data_tools.md schema)")
    parser.add_argument("--output", help="jsonl file to write: the kept samples, each with an 'execution' field")
    parser.add_argument("--keep", choices=sorted(KEEP), default="all", help="which samples to write")
    defaults = SandboxConfig()
    parser.add_argument("--workers", type=int, default=defaults.workers, help="samples run at once")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="wall-clock limit per run")
    parser.add_argument("--cpu-s", type=float, default=None, help="CPU limit per process (default: --timeout-s)")
    parser.add_argument("--memory-mb", type=int, default=defaults.memory_mb, help="RLIMIT_DATA per process")
    parser.add_argument("--max-processes", type=int, default=defaults.max_processes, help="processes + threads")
    parser.add_argument("--compile-timeout-s", type=float, default=defaults.compile_timeout_s)
    parser.add_argument("--allow-network", action="store_true", help="do not isolate the network")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--list-toolchains", action="store_true",
                        help="print the detected toolchains and the isolation in force, then exit")
    return parser


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(timeout_s=args.timeout_s, cpu_s=args.cpu_s if args.cpu_s is not None else args.timeout_s,
                         memory_mb=args.memory_mb, max_processes=args.max_processes, workers=args.workers,
                         compile_timeout_s=args.compile_timeout_s, network=args.allow_network,
                         progress=False if args.no_progress else None)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m data_tools.sandbox`` (and of the ``data_tools`` dispatcher)."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        config = config_from_args(args)
        if args.list_toolchains:
            print(toolchain_table())
            print(f"isolation: {plan_isolation(config).description}")
            return
        if not args.input or not args.output:
            raise DataToolError("--input and --output are required (or pass --list-toolchains)")
        started = time.monotonic()
        counts = validate_file(args.input, args.output, config, args.keep, args.overwrite)
        kept = sum(n for (_, verdict), n in counts.items() if KEEP[args.keep](verdict))
        print(f"validated {sum(counts.values())} samples in {time.monotonic() - started:.1f} s; "
              f"wrote {kept} ({args.keep}) to {args.output}")
        print(summary_table(counts))

    run_cli(PROG, run)
