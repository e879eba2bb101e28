"""Work items: the unit a strategy runs, its deterministic sample id, and who (which teacher) does it.

Everything about an item (teacher, language, snippet window, mutation) is drawn from an RNG
seeded by the run seed and the item's own key, never from a shared stream, so the draw does
not depend on how many items came before, on concurrency, or on what a crashed run finished.
That is what lets a rerun recompute the exact same ids and skip the ones already written.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from data_tools.generate.config import GenerationConfig, StrategySpec
from data_tools.records import stable_id
from data_tools.teacher.config import TeacherConfig


@dataclass(frozen=True, eq=False)
class WorkItem:
    """One unit of work of one strategy."""

    strategy: str
    """Strategy name."""
    origin_id: str
    """Id of the seed document (seeded strategies) or of the source sample (sample strategies)."""
    index: int
    """Repetition of the same origin (seeds are cycled when count exceeds them); 0 for sample strategies."""
    teacher: str
    """Name of the teacher that answers this item."""
    language: str
    """Language of the sample to produce."""
    seed: dict | None = None
    """The seed document, for seeded strategies."""
    source: dict | None = None
    """The source sample, for sample strategies."""

    @property
    def key(self) -> str:
        return f"{self.strategy}/{self.origin_id}/{self.index}"

    def sample_id(self, round_: int = 0) -> str:
        """Stable id of the sample this item produces in ``round_`` (evol_instruct has several)."""
        return stable_id(self.strategy, self.origin_id, self.teacher, str(round_), str(self.index))

    @property
    def seed_id(self) -> str | None:
        """Id of the seed document at the root of this item's lineage."""
        if self.seed is not None:
            return self.seed["id"]
        return (self.source or {}).get("seed_id")


def item_rng(run_seed: int, purpose: str, key: str) -> random.Random:
    """An RNG private to one decision about one item (str seeds hash with SHA-512: stable across processes)."""
    return random.Random(f"{run_seed}/{purpose}/{key}")


def choose_teacher(run_seed: int, key: str, teachers: Sequence[TeacherConfig]) -> str:
    """Draw a teacher for ``key`` with probability proportional to its weight."""
    rng = item_rng(run_seed, "teacher", key)
    return rng.choices([t.name for t in teachers], weights=[t.weight for t in teachers])[0]


def seeded_items(spec: StrategySpec, seeds: Sequence[dict], config: GenerationConfig) -> Iterator[WorkItem]:
    """``spec.count`` items over the seeds, cycling through them in file order."""
    for i in range(spec.count):
        seed, index = seeds[i % len(seeds)], i // len(seeds)
        key = f"{spec.name}/{seed['id']}/{index}"
        language = "python" if spec.name == "humaneval_style" else \
            item_rng(config.seed, "language", key).choice(config.languages)
        yield WorkItem(strategy=spec.name, origin_id=seed["id"], index=index,
                       teacher=choose_teacher(config.seed, key, config.teachers), language=language, seed=seed)


def sample_items(spec: StrategySpec, sources: Sequence[dict], config: GenerationConfig) -> Iterator[WorkItem]:
    """One item per source sample; with ``spec.count`` > 0 only the first ``count`` by id.

    Sorting by id makes the choice independent of the order in which a concurrent earlier
    stage happened to write its samples.
    """
    chosen = sorted(sources, key=lambda s: s["id"])
    if spec.count:
        chosen = chosen[:spec.count]
    for source in chosen:
        key = f"{spec.name}/{source['id']}/0"
        yield WorkItem(strategy=spec.name, origin_id=source["id"], index=0,
                       teacher=choose_teacher(config.seed, key, config.teachers),
                       language=source.get("language") or "python", source=source)
