"""Near-duplicate detection with datatrove's MinHash-LSH steps, run shard by shard.

datatrove does the heavy lifting: ``MinhashDedupSignature`` (per input shard),
``MinhashDedupBuckets`` (per LSH band) and ``MinhashDedupCluster`` (union-find over the
candidate pairs). This module picks the LSH shape for a Jaccard threshold, feeds the steps
our jsonl shards, and reads their binary outputs back as clusters of (shard, position).
"""
from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupSignature)
from datatrove.utils.logging import logger

from data_tools._common import iter_jsonl_objects
from data_tools.records import record_text
from data_tools.text_ngrams import HASH_CONFIG, NORM_CONFIG, CodeWordTokenizer


@dataclass(frozen=True)
class LshShape:
    """``bands`` bands of ``rows`` hashes: a pair is a candidate when all rows of some band agree."""

    bands: int
    rows: int

    @property
    def threshold(self) -> float:
        """Jaccard at which a pair becomes a candidate with probability ~1/2: (1/bands)^(1/rows)."""
        return (1 / self.bands) ** (1 / self.rows)


def lsh_shape(threshold: float, num_hashes: int) -> LshShape:
    """The bands x rows (bands * rows <= num_hashes) whose S-curve midpoint is closest to ``threshold``.

    With 112 hashes and 0.7 this is datatrove's default 14 x 8 (midpoint 0.72).
    """
    shapes = [LshShape(num_hashes // rows, rows) for rows in range(1, num_hashes + 1) if num_hashes // rows >= 1]
    return min(shapes, key=lambda s: (abs(s.threshold - threshold), -s.bands * s.rows))


def minhash_config(shape: LshShape, ngram_size: int, seed: int) -> MinhashConfig:
    return MinhashConfig(n_grams=ngram_size, num_buckets=shape.bands, hashes_per_bucket=shape.rows, seed=seed,
                         norm_config=NORM_CONFIG, hash_config=HASH_CONFIG)


@contextlib.contextmanager
def _quiet_datatrove():
    logger.disable("datatrove")  # its per-step INFO lines would drown our progress bars
    try:
        yield
    finally:
        logger.enable("datatrove")


def sign_shard(work_dir: str, shard: int, path: str, skip: frozenset, config: MinhashConfig) -> int:
    """Write the MinHash signatures of shard ``shard``; positions in ``skip`` get none.

    Skipped records are passed as empty documents so that datatrove's document index stays
    equal to the record's position in the shard.
    """
    step = MinhashDedupSignature(os.path.join(work_dir, "signatures"), config=config, language=CodeWordTokenizer())
    docs = (Document(text="" if i in skip else record_text(record), id=str(i))
            for i, record in enumerate(iter_jsonl_objects(path)))
    with _quiet_datatrove():
        step.run(docs, rank=shard, world_size=1)
    return shard


def bucket_pairs(work_dir: str, band: int, config: MinhashConfig) -> int:
    """Candidate pairs of one LSH band (datatrove's stage 2; one task per band)."""
    step = MinhashDedupBuckets(os.path.join(work_dir, "signatures"), os.path.join(work_dir, "buckets"), config=config)
    with _quiet_datatrove():
        step.run(None, rank=band, world_size=config.num_buckets)
    return band


def clusters(work_dir: str, num_shards: int, config: MinhashConfig) -> tuple[list[set[int]], dict[int, list[tuple[int, int]]]]:
    """(positions datatrove removes per shard, members of each cluster as (shard, position))."""
    out = os.path.join(work_dir, "clusters")
    step = MinhashDedupCluster(os.path.join(work_dir, "buckets"), out, config=config, save_cluster_id=True)
    with _quiet_datatrove():
        step.run(None, world_size=1)
    removed: list[set[int]] = [set() for _ in range(num_shards)]
    members: dict[int, list[tuple[int, int]]] = {}
    for shard in range(num_shards):
        remove_file = os.path.join(out, f"{shard:06d}.remove")
        if os.path.exists(remove_file):
            removed[shard] = set(np.fromfile(remove_file, dtype="<u4").tolist())
        cluster_file = os.path.join(out, f"{shard:06d}.clusters")
        if os.path.exists(cluster_file):
            with open(cluster_file, "rb") as f:
                for position, cluster in struct.iter_unpack("<II", f.read()):
                    members.setdefault(cluster, []).append((shard, position))
    return removed, members
