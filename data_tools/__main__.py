"""``python -m data_tools <command> [args]``: one entry point for every data tool.

Each command is a module's ``main(argv)``, imported only when that command runs, so a typo
or ``--help`` costs no heavy imports (torch, megatron-core, datatrove).
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module:function, one-line description)
COMMANDS = {
    "seed-corpus": ("data_tools.seed_corpus:main", "jsonl of a local permissively licensed tree (default: the stdlib)"),
    "train-tokenizer": ("data_tools.train_tokenizer:main", "train the sentencepiece BPE tokenizer"),
    "preprocess-data": ("data_tools.preprocess_data:main", "tokenize jsonl into megatron .bin/.idx"),
    "ingest": ("data_tools.ingest.cli:main", "files/dirs/git checkouts/jsonl -> license- and quality-filtered seeds"),
    "dedup": ("data_tools.dedup:main", "exact + MinHash near-duplicate removal with a report"),
    "decontaminate": ("data_tools.decontaminate:main", "remove HumanEval / benchmark overlap with a report"),
    "report": ("data_tools.report:main", "coverage report (JSON + self-contained HTML)"),
    "export": ("data_tools.export:main", "pretrain/SFT/DPO jsonl, tokenized .bin/.idx, manifest.json"),
    "pipeline": ("data_tools.pipeline:main", "run a YAML recipe of stages end to end (local, Slurm, Ray)"),
    "generate": ("data_tools.generate:main", "synthesize samples with a teacher LLM"),
    "sandbox": ("data_tools.sandbox:main", "run/validate programs in the execution sandbox"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m data_tools <command> [args]   (python -m data_tools <command> --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command = argv[0].replace("_", "-")
    if command not in COMMANDS:
        from difflib import get_close_matches

        close = get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SystemExit(f"python -m data_tools: unknown command {argv[0]!r}{hint}\n\n{usage()}")
    module_name, function = COMMANDS[command][0].split(":")
    getattr(importlib.import_module(module_name), function)(argv[1:])


if __name__ == "__main__":
    main()
