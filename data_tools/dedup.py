"""Exact and near-duplicate removal over sharded jsonl, with a report of every removal.

1. Exact: records whose normalized text (trailing whitespace and blank lines dropped) has the
   same hash as an earlier record (in shard order) are removed. Hand-written because
   datatrove's ExactDedup steps record only which document to drop, not which one it
   duplicates, and the report names both; a dict of 16-byte digests is all it takes.
2. Near: datatrove's MinHash-LSH over word 5-grams (see :mod:`data_tools.minhash`) proposes
   clusters; each removed record's true Jaccard similarity to the record its cluster keeps is
   then measured, and with ``verify`` a pair below ``threshold`` (an LSH false positive) is kept.

Example::

    python -m data_tools dedup --input seed.jsonl --output seed.dedup.jsonl --report dedup.json
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

from data_tools._common import DataToolError, check_outputs_free, iter_jsonl_objects, require_file, run_cli
from data_tools.minhash import bucket_pairs, clusters, lsh_shape, minhash_config, sign_shard
from data_tools.records import execution_verdict, record_text, write_json_atomic, write_records_atomic
from data_tools.text_ngrams import jaccard, shingle_set

PROG = "python -m data_tools dedup"


@dataclass
class DedupConfig:
    """Exact and MinHash near-duplicate removal."""

    exact: bool = True
    """Remove records whose normalized text equals an earlier record's."""
    near: bool = True
    """Remove near-duplicates (MinHash-LSH over word n-grams)."""
    ngram_size: int = 5
    """Words per shingle. Smaller finds more (and looser) duplicates."""
    threshold: float = 0.7
    """Jaccard similarity of shingle sets above which two records are near-duplicates."""
    num_hashes: int = 112
    """MinHash permutations; split into bands x rows so that the LSH midpoint is near ``threshold``."""
    verify: bool = True
    """Keep a candidate whose measured Jaccard to its cluster's kept record is below ``threshold``."""
    seed: int = 1
    """Seed of the MinHash permutations (same seed, same result)."""
    keep_failing_samples: bool = True
    """Pass samples whose execution did not pass through untouched (never removed, never the reason another
    record is): export pairs them with a passing solution of the same problem for DPO, and such a pair is a
    near-duplicate by construction."""

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise DataToolError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.ngram_size < 1 or self.num_hashes < 2:
            raise DataToolError(f"ngram_size must be >= 1 and num_hashes >= 2, got {self.ngram_size}, {self.num_hashes}")
        if not (self.exact or self.near):
            raise DataToolError("both exact and near are off; enable one or remove the dedup stage")


def normalized_digest(text: str) -> bytes:
    lines = (line.rstrip() for line in text.strip().splitlines())
    return hashlib.blake2b("\n".join(line for line in lines if line).encode("utf-8"), digest_size=16).digest()


def shard_digests(path: str, keep_failing: bool = False) -> list[tuple[bytes | None, str, str]]:
    """(normalized digest, id, path) of every record of one shard, in order; with ``keep_failing`` the
    digest of a sample that failed execution is None (it takes no part in dedup)."""
    return [(None if keep_failing and execution_verdict(r) not in (None, "pass") else normalized_digest(record_text(r)),
             str(r.get("id", "")), str(r.get("path", ""))) for r in iter_jsonl_objects(path)]


def shard_shingles(path: str, positions: frozenset, ngram_size: int) -> dict[int, tuple[set, str, str]]:
    """Shingle sets (and id, path) of the records at ``positions`` of one shard."""
    return {i: (shingle_set(record_text(r), ngram_size), str(r.get("id", "")), str(r.get("path", "")))
            for i, r in enumerate(iter_jsonl_objects(path)) if i in positions}


def filter_shard(path: str, output: str, removed: frozenset) -> int:
    records = (r for i, r in enumerate(iter_jsonl_objects(path)) if i not in removed)
    return write_records_atomic(output, records)["records"]


def _removal(shard: int, record_id: str, path: str, reason: str, kept: tuple[str, str], **extra) -> dict:
    return {"id": record_id, "path": path, "shard": shard, "reason": reason,
            "duplicate_of": kept[0], "duplicate_of_path": kept[1], **extra}


def exact_removals(digests: list[list[tuple[bytes, str, str]]]) -> tuple[list[set[int]], list[dict]]:
    """Positions to drop per shard, and why: every repeat of an earlier normalized text."""
    seen: dict[bytes, tuple[str, str]] = {}
    removed: list[set[int]] = [set() for _ in digests]
    removals = []
    for shard, shard_digests_ in enumerate(digests):
        for position, (digest, record_id, path) in enumerate(shard_digests_):
            if digest is None:
                continue
            if digest in seen:
                removed[shard].add(position)
                removals.append(_removal(shard, record_id, path, "exact_duplicate", seen[digest]))
            else:
                seen[digest] = (record_id, path)
    return removed, removals


@dataclass
class _NearResult:
    removed: list[set[int]]
    removals: list[dict]
    candidates_kept: int  # LSH candidates whose measured Jaccard was below the threshold


def near_removals(inputs: Sequence[str], skip: list[set[int]], config: DedupConfig, pool_map, work_dir: str) -> _NearResult:
    """MinHash-LSH clusters (datatrove), then each removal checked against its cluster's kept record."""
    mh = minhash_config(lsh_shape(config.threshold, config.num_hashes), config.ngram_size, config.seed)
    pool_map(sign_shard, [(work_dir, s, path, frozenset(skip[s]), mh) for s, path in enumerate(inputs)],
             "dedup: signatures")
    pool_map(bucket_pairs, [(work_dir, band, mh) for band in range(mh.num_buckets)], "dedup: LSH bands")
    removed, members = clusters(work_dir, len(inputs), mh)
    wanted: list[set[int]] = [set() for _ in inputs]
    for cluster in members.values():
        for shard, position in cluster:
            wanted[shard].add(position)
    shingles = pool_map(shard_shingles, [(path, frozenset(wanted[s]), config.ngram_size) for s, path in enumerate(inputs)],
                        "dedup: verify")
    result = _NearResult(removed, [], 0)
    for cluster in members.values():
        kept_shard, kept_pos = next((s, p) for s, p in cluster if p not in removed[s])
        kept_shingles, kept_id, kept_path = shingles[kept_shard][kept_pos]
        for shard, position in cluster:
            if position not in removed[shard]:
                continue
            own, record_id, path = shingles[shard][position]
            similarity = jaccard(own, kept_shingles)
            if config.verify and similarity < config.threshold:
                removed[shard].discard(position)
                result.candidates_kept += 1
                continue
            result.removals.append(_removal(shard, record_id, path, "near_duplicate", (kept_id, kept_path),
                                            jaccard=round(similarity, 4)))
    return result


def deduplicate(inputs: Sequence[str], outputs: Sequence[str], report_path: str, config: DedupConfig,
                pool_map, work_dir: str) -> dict:
    """Deduplicate shards ``inputs`` into ``outputs`` (same order); write and return the report.

    ``pool_map(fn, tasks, desc)`` runs ``fn(*task)`` for every task (a process pool or a loop).
    """
    digests = pool_map(shard_digests, [(path, config.keep_failing_samples) for path in inputs], "dedup: hashing")
    removed, removals = exact_removals(digests) if config.exact else ([set() for _ in inputs], [])
    exempt = [{i for i, (digest, _, _) in enumerate(shard) if digest is None} for shard in digests]
    candidates_kept = 0
    if config.near:
        near = near_removals(inputs, [r | e for r, e in zip(removed, exempt)], config, pool_map, work_dir)
        candidates_kept = near.candidates_kept
        removals += near.removals
        for shard, positions in enumerate(near.removed):
            removed[shard] |= positions
    kept = pool_map(filter_shard, [(i, o, frozenset(removed[s])) for s, (i, o) in enumerate(zip(inputs, outputs))],
                    "dedup: writing")
    shape = lsh_shape(config.threshold, config.num_hashes)
    counts = {"input": sum(len(d) for d in digests), "output": sum(kept),
              "exact_duplicate": sum(r["reason"] == "exact_duplicate" for r in removals),
              "near_duplicate": sum(r["reason"] == "near_duplicate" for r in removals),
              "near_duplicate_candidates_kept": candidates_kept, "failing_samples_kept": sum(map(len, exempt))}
    report = {"config": vars(config), "lsh": {"bands": shape.bands, "rows": shape.rows,
                                              "midpoint_jaccard": round(shape.threshold, 4)},
              "counts": counts, "removed": removals}
    write_json_atomic(report_path, report)
    return report


def _local_map(workers: int):
    from data_tools.pipeline.executors import run_local

    return lambda fn, tasks, desc: run_local(fn, tasks, workers, desc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="jsonl records (seed documents or samples)")
    parser.add_argument("--output", required=True, help="jsonl of the records kept")
    parser.add_argument("--report", required=True, help="JSON report of every removal and why")
    parser.add_argument("--threshold", type=float, default=DedupConfig.threshold, help="near-duplicate Jaccard")
    parser.add_argument("--ngram-size", type=int, default=DedupConfig.ngram_size, help="words per shingle")
    parser.add_argument("--no-exact", action="store_true", help="skip exact dedup")
    parser.add_argument("--no-near", action="store_true", help="skip near-duplicate dedup")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def run() -> None:
        import tempfile

        config = DedupConfig(exact=not args.no_exact, near=not args.no_near, ngram_size=args.ngram_size,
                             threshold=args.threshold)
        config.check()
        require_file(args.input, "--input", "pass a jsonl file")
        check_outputs_free([args.output, args.report], args.overwrite, "--output/--report")
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output))) as work:
            report = deduplicate([args.input], [args.output], args.report, config, _local_map(1), work)
        print(", ".join(f"{k}={v}" for k, v in report["counts"].items()) + f"; report: {args.report}")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
