"""Tokenize + write throughput of `mcode-preprocess-data` against the plainest correct loop: one
process reading the jsonl, `SentencePieceProcessor.encode`, `IndexedDatasetBuilder.add_item` +
`end_document`, `finalize`. Both write the same `.bin/.idx` (checked byte for byte), same process,
alternating order over repeats; reported: median seconds and tokens/s per variant.

    PYTHONPATH=. python benchmarks/bench_tokenize.py --input data.jsonl --tokenizer-model tok.model
    PYTHONPATH=. python benchmarks/bench_tokenize.py            # the stdlib corpus + fixture tokenizer

Results: docs/data_tools.md ("Throughput").
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import tempfile
import time

import numpy as np
import sentencepiece as spm
import torch

from data_tools.preprocess_data import _import_indexed_dataset, preprocess_data
from data_tools.seed_corpus import build_seed_corpus

FIXTURE_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "code_bpe_2048.model")


def plain_loop(input_path: str, tokenizer_model: str, prefix: str) -> int:
    """The reference: single process, no validation, no progress, no atomic rename."""
    indexed = _import_indexed_dataset()
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    dtype = indexed.DType.optimal_dtype(sp.get_piece_size())
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    tokens = 0
    with open(input_path) as fh:
        for line in fh:
            ids = sp.encode(json.loads(line)["text"]) + [sp.eos_id()]
            builder.add_item(torch.from_numpy(np.array(ids, dtype=np.int64)))
            builder.end_document()
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def ours(input_path: str, tokenizer_model: str, prefix: str, workers: int) -> int:
    summary = preprocess_data(input_path, tokenizer_model, prefix, workers=workers, progress=False, overwrite=True)
    return summary.tokens["text"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="jsonl with a 'text' field (default: the stdlib seed corpus)")
    parser.add_argument("--tokenizer-model", default=FIXTURE_TOKENIZER)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.input or os.path.join(tmp, "seed.jsonl")
        if not args.input:
            build_seed_corpus(source)
        variants = {"plain loop (1 process)": lambda p: plain_loop(source, args.tokenizer_model, p)}
        for w in args.workers:
            variants[f"mcode-preprocess-data --workers {w}"] = (
                lambda p, w=w: ours(source, args.tokenizer_model, p, w))
        times = {name: [] for name in variants}
        tokens = {}
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                prefix = os.path.join(tmp, f"out{list(variants).index(name)}")
                start = time.perf_counter()
                tokens[name] = variants[name](prefix)
                times[name].append(time.perf_counter() - start)
        same = all(filecmp.cmp(os.path.join(tmp, "out0.bin"), os.path.join(tmp, f"out{i}_text_document.bin"),
                               shallow=False) for i in range(1, len(variants)))
        print(f"input {source}: {os.path.getsize(source) / 2**20:.1f} MiB, {tokens[next(iter(tokens))]:,} tokens; "
              f"outputs identical: {same}; {os.cpu_count()} CPUs")
        print("| variant | median s | tokens/s | vs plain loop |\n| --- | ---: | ---: | ---: |")
        base = statistics.median(times["plain loop (1 process)"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| {name} | {median:.2f} | {tokens[name] / median:,.0f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
