"""Which rank is slow (--log-straggler): every log interval, each rank's own forward-backward
time and host data wait, gathered from all ranks, with the slowest ranks and their hosts named.

A step's wall time cannot show a straggler: every data-parallel rank waits for the slowest one in
the gradient reduction, so all ranks report the same step time. What differs is the time each
rank spends before that wait. Per step each rank measures
- forward-backward: from the moment its step's loss-token count is summed over the data-parallel
  ranks (a point every rank passes together) to the moment its last backward work is done, on
  the GPU's timeline (CUDA events; the host clock on CPU). The gradient reduction's wait comes
  after it. Tensor- and pipeline-parallel communication sits inside it, so a slow GPU also slows
  its tensor-parallel group and pipeline neighbours: the slowest rank is the one to look at
  first, its group next.
- host data wait: how long the host waited for the step's micro-batches (a slow file system or
  data worker on one node).

The values travel through the job's rendezvous store (torchrun's TCPStore), not a collective:
every rank posts its numbers (two store operations, ~0.1 ms) and goes on, and only rank 0, which
logs, waits for them (one key, then one read: ~0.5 ms for 512 ranks on loopback). A collective on
the GPU would be queued behind the next step's work (reading it would stall the launched steps),
and a gloo group over all ranks would open a connection between every pair of the 512 ranks.
Megatron-LM's StragglerDetector reports the same min/max of per-rank forward-backward times.
"""
from __future__ import annotations

import datetime
import socket
import statistics

import torch.distributed as dist

from megatron_code.parallel.state import distributed_timeout

MEASURES = ("forward_backward_ms", "data_wait_ms")
DEFAULT_WAIT = datetime.timedelta(minutes=10)


class StragglerReport:
    """Accumulates this rank's per-step times; `report` posts their means since the previous
    report, and on rank 0 waits for every rank's and summarizes them."""

    def __init__(self, store, rank: int, world_size: int, report_count: int,
                 wait: datetime.timedelta = DEFAULT_WAIT):
        """store: shared by all ranks (the job's rendezvous store: `for_job`)."""
        self.store = dist.PrefixStore("straggler", store)
        self.rank, self.world_size, self.report_count, self.wait = rank, world_size, report_count, wait
        self._post("hosts", socket.gethostname())
        self.hosts: list[str] | None = None  # rank 0's, read at its first report
        self._sums, self._steps, self._reports = [0.0] * len(MEASURES), 0, 0

    @classmethod
    def for_job(cls, report_count: int, timeout_minutes: float | None) -> "StragglerReport":
        """Over the default process group's store; rank 0 waits up to --distributed-timeout-minutes."""
        return cls(dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size(),
                   report_count, distributed_timeout(timeout_minutes) or DEFAULT_WAIT)

    def add(self, forward_backward_s: float, data_wait_s: float) -> None:
        self._sums = [total + 1000 * seconds for total, seconds in zip(self._sums, (forward_backward_s, data_wait_s))]
        self._steps += 1

    def report(self) -> dict | None:
        """Post this rank's mean times per step since the last report; on rank 0 return every
        rank's, summarized (None elsewhere). Every rank reports at the same steps."""
        steps, self._steps = self._steps, 0
        mine = [total / max(steps, 1) for total in self._sums]
        self._sums = [0.0] * len(MEASURES)
        name, self._reports = str(self._reports), self._reports + 1
        self._post(name, ",".join(map(repr, mine)))
        if self.rank != 0:
            return None
        if self.hosts is None:
            self.hosts = self._collect("hosts")
        per_rank = [[float(value) for value in row.split(",")] for row in self._collect(name)]
        return summarize(per_rank, self.hosts, self.report_count, steps)

    def _post(self, name: str, value: str) -> None:
        """Add this rank's value under name (two store operations); the last rank to post marks
        the name complete, so that rank 0 waits on one key rather than polling."""
        self.store.append(name, f"{self.rank}={value};")
        if self.store.add(f"{name}/count", 1) == self.world_size:
            self.store.set(f"{name}/complete", "")

    def _collect(self, name: str) -> list[str]:
        """Every rank's value posted under name, by rank, once all have posted; the keys are
        deleted so the store does not grow with the run."""
        try:
            self.store.wait([f"{name}/complete"], self.wait)
        except dist.DistStoreError:
            raise TimeoutError(
                f"--log-straggler: ranks {self._missing(name)} did not post their times for report {name!r} "
                f"within {self.wait}: they are stuck or gone (their collectives will time out too).") from None
        entries = self.store.get(name).decode().rstrip(";").split(";")
        for key in (name, f"{name}/count", f"{name}/complete"):
            self.store.delete_key(key)
        values = dict(entry.split("=", 1) for entry in entries)
        return [values[str(rank)] for rank in range(self.world_size)]

    def _missing(self, name: str) -> list[int]:
        """The ranks that have not posted under name (for the timeout's message)."""
        posted = self.store.get(name).decode() if self.store.check([name]) else ""
        seen = {int(entry.split("=", 1)[0]) for entry in posted.split(";") if entry}
        return [rank for rank in range(self.world_size) if rank not in seen]


def summarize(per_rank: list[list[float]], hosts: list[str], report_count: int, steps: int) -> dict:
    """per_rank[r] = [forward-backward ms, data-wait ms] of rank r -> min/median/max of each with
    the ranks that hold them, and the report_count slowest ranks by forward-backward time."""
    summary: dict = {"steps": steps}
    for column, name in enumerate(MEASURES):
        values = [row[column] for row in per_rank]
        low = min(range(len(values)), key=values.__getitem__)
        high = max(range(len(values)), key=values.__getitem__)
        median = statistics.median(values)
        summary[name] = {"min": values[low], "min_rank": low, "median": median, "max": values[high],
                         "max_rank": high, "max_over_median": values[high] / median if median > 0 else None}
    order = sorted(range(len(per_rank)), key=lambda rank: per_rank[rank][0], reverse=True)
    summary["slowest"] = [{"rank": rank, "host": hosts[rank], "forward_backward_ms": per_rank[rank][0],
                           "data_wait_ms": per_rank[rank][1]} for rank in order[:report_count]]
    summary["hosts"] = {str(rank): hosts[rank] for rank in
                        {summary[name][key] for name in MEASURES for key in ("min_rank", "max_rank")}}
    return summary


def format_straggler_line(summary: dict) -> str:
    """The console line under a log line: where the time of the slowest and fastest ranks went."""
    hosts = summary["hosts"]

    def at(rank: int) -> str:
        return f"rank {rank} {hosts[str(rank)]}"

    fb, wait = summary["forward_backward_ms"], summary["data_wait_ms"]
    ratio = f", {fb['max_over_median']:.2f}x median" if fb["max_over_median"] is not None else ""
    line = (f" stragglers (ms/step over {summary['steps']} steps): forward-backward min {fb['min']:.1f} "
            f"({at(fb['min_rank'])}) | median {fb['median']:.1f} | max {fb['max']:.1f} ({at(fb['max_rank'])}){ratio}"
            f" | host data wait median {wait['median']:.1f}, max {wait['max']:.1f} ({at(wait['max_rank'])})")
    if len(summary["slowest"]) > 1:
        line += " | slowest: " + ", ".join(f"rank {r['rank']} {r['host']} {r['forward_backward_ms']:.1f}"
                                           for r in summary["slowest"])
    return line


def straggler_scalars(summary: dict) -> dict[str, float]:
    """The summary's numbers as flat scalars for TensorBoard and wandb."""
    scalars = {}
    for name in MEASURES:
        for key in ("min", "median", "max", "max_over_median"):
            value = summary[name][key]
            if value is not None:
                scalars[f"straggler/{name}_{key}"] = value
    return scalars
