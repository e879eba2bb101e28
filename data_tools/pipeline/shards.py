"""Shard files, done markers and fingerprints: what lets a rerun skip finished work.

Layout of one stage directory::

    03_dedup/
      shard-00000.jsonl            output documents of shard 0
      shard-00000.done.json        map stages: marker of shard 0 (written after the output)
      _DONE.json                   global stages: marker of the whole stage
      _inputs/shard-00000.jsonl    map stages with a plan (ingest): the shard's input entries
      _state/shard-00000/          map stages with a shard context (generate): their resumable state

A marker records the sha256 of the stage config, of its input(s) and of its output(s). Work
is skipped only when the marker exists, the outputs exist with the recorded sizes, and the
config and input digests still match; so deleting an output, editing the stage's config or a
changed upstream shard each cause exactly the affected work to run again.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
from typing import Any, Callable, Sequence

from data_tools.pipeline.config_loader import to_dict
from data_tools.records import file_sha256

STAGE_MARKER = "_DONE.json"
INPUTS_DIR = "_inputs"
WORK_DIR = "_work"
STATE_DIR = "_state"  # map stages' own resumable state, per shard (see context.ShardContext)


def shard_file(directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}.jsonl")


def shard_marker(directory: str, shard: int) -> str:
    return os.path.join(directory, f"shard-{shard:05d}.done.json")


def config_sha256(config: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # a marker cut short by a crash counts as absent: the work reruns


def outputs_intact(directory: str, outputs: dict) -> bool:
    """Every recorded output exists with its recorded size (a cheap stand-in for re-hashing)."""
    for name, info in outputs.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) != info["bytes"]:
            return False
    return True


def stage_outputs(directory: str) -> dict:
    """``{relative path: {"sha256", "bytes"}}`` of a stage directory's outputs (markers, _* excluded)."""
    outputs = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
        for name in sorted(filenames):
            if name.startswith(("_", ".")) or name.endswith(".done.json"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            outputs[rel] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    return outputs


def shard_fingerprint(directory: str, shard: int) -> str | None:
    """sha256 of a finished document shard, from its marker (map) or the stage marker (global)."""
    marker = read_json(shard_marker(directory, shard))
    if marker is not None:
        return marker["output"]["sha256"]
    stage = read_json(os.path.join(directory, STAGE_MARKER)) or {}
    info = stage.get("outputs", {}).get(os.path.basename(shard_file(directory, shard)))
    return info["sha256"] if info else None


def balance(items: Sequence[dict], num_shards: int, weight: Callable[[dict], int]) -> list[list[dict]]:
    """Spread ``items`` over shards by weight (heaviest first onto the lightest shard).

    Each shard keeps its items in their original order, so shards are deterministic.
    """
    loads = [(0, shard) for shard in range(num_shards)]  # a heap of (load, shard)
    assignment = [0] * len(items)
    for index in sorted(range(len(items)), key=lambda i: (-weight(items[i]), i)):
        load, shard = heapq.heappop(loads)
        assignment[index] = shard
        heapq.heappush(loads, (load + max(weight(items[index]), 1), shard))
    shards: list[list[dict]] = [[] for _ in range(num_shards)]
    for index, item in enumerate(items):
        shards[assignment[index]].append(item)
    return shards
