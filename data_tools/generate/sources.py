"""The inputs of each strategy: seed documents, or samples from earlier strategies or from a file."""
from __future__ import annotations

from typing import Callable, Sequence

from data_tools._common import DataToolError, parse_json_object
from data_tools.generate.config import SEEDED_STRATEGIES, StrategySpec
from data_tools.generate.journal import ACCEPTED, REJECTED, SampleJournal


def strategy_inputs(spec: StrategySpec, journal: SampleJournal, earlier: Sequence[str],
                    seeds: list[dict]) -> list[dict]:
    """Seeds for seeded strategies; for the others the samples named by ``spec.source``.

    repair reads validation failures (rejected.jsonl), the others accepted samples
    (samples.jsonl). A source that is not an earlier strategy is a samples file.
    """
    if spec.name in SEEDED_STRATEGIES:
        return seeds
    if spec.source is not None and spec.source not in earlier:
        return read_samples(spec.source)
    if spec.name == "repair":
        names = {spec.source} if spec.source else set(earlier)
        return [r for r in journal.records(REJECTED)
                if r["strategy"] in names and r.get("rejection", {}).get("stage") == "validation"]
    return [r for r in journal.records(ACCEPTED) if r["strategy"] == spec.source]


def read_samples(path: str) -> list[dict]:
    """Samples from a jsonl file; each line must be an object with a string ``id``."""
    return read_records(path, lambda r: isinstance(r.get("id"), str), "a sample must have a string 'id'")


def read_records(path: str, valid: Callable[[dict], object], requirement: str) -> list[dict]:
    """JSON objects of a jsonl file; a line that is not one, or fails ``valid``, is an error naming ``file:line``."""
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            record = parse_json_object(raw, path, lineno)
            if record is None:
                continue
            if not valid(record):
                raise DataToolError(f"{path}:{lineno}: {requirement}")
            records.append(record)
    return records
