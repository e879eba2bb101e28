"""--log-straggler: the per-rank summary (pure function) and a 2-rank torchrun job with one rank
slowed in its forward and the other in its data loading, each of which the report must name."""
import datetime
import json
import os
import re
import socket

import pytest
import torch

from megatron_code.training.straggler import StragglerReport, format_straggler_line, straggler_scalars, summarize
from tests.conftest import tiny_run
from tests.test_parallel import launch


def test_summary_names_the_slowest_and_fastest_ranks_and_their_hosts():
    per_rank = [[100.0, 1.0], [103.0, 9.0], [150.0, 2.0], [101.0, 3.0]]  # [forward-backward ms, data wait ms]
    hosts = ["node-a", "node-a", "node-b", "node-b"]
    summary = summarize(per_rank, hosts, report_count=2, steps=10)
    fb, wait = summary["forward_backward_ms"], summary["data_wait_ms"]
    assert (fb["min_rank"], fb["max_rank"], wait["min_rank"], wait["max_rank"]) == (0, 2, 0, 1)
    assert fb["median"] == 102.0 and abs(fb["max_over_median"] - 150 / 102) < 1e-12
    assert [r["rank"] for r in summary["slowest"]] == [2, 1]
    assert summary["slowest"][0] == {"rank": 2, "host": "node-b", "forward_backward_ms": 150.0, "data_wait_ms": 2.0}
    line = format_straggler_line(summary)
    assert "over 10 steps" in line and "max 150.0 (rank 2 node-b), 1.47x median" in line
    assert "host data wait median 2.5, max 9.0 (rank 1 node-a)" in line
    assert "slowest: rank 2 node-b 150.0, rank 1 node-a 103.0" in line
    assert straggler_scalars(summary)["straggler/forward_backward_ms_max"] == 150.0


def test_zero_times_give_no_ratio():
    summary = summarize([[0.0, 0.0]], ["h"], report_count=1, steps=1)
    assert summary["forward_backward_ms"]["max_over_median"] is None
    assert "x median" not in format_straggler_line(summary)
    assert "straggler/forward_backward_ms_max_over_median" not in straggler_scalars(summary)


def test_a_slow_rank_is_named_in_the_log(fixture_data, tmp_path):
    """Rank 1 sleeps 0.1 s before each of its 2 forwards per step (a slow GPU), rank 0 before each
    of its 2 micro-batches (slow data). Both ranks then take the same time per step; only the
    report tells them apart, and each sleep must land in its own measure, not the other rank's."""
    metrics = str(tmp_path / "m.jsonl")
    values = tiny_run(fixture_data, train_iters=4, micro_batch_size=2, global_batch_size=8, seq_length=128,
                      log_interval=2, log_straggler=True, metrics_file=metrics)
    probe = os.path.join(os.path.dirname(__file__), "straggler_probe.py")
    result = launch(2, values, program=(probe, "1", "0", "0.1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads(line)["straggler"] for line in open(metrics) if '"straggler"' in line]
    assert [r["steps"] for r in reports] == [2, 2]
    for report in reports:
        fb, wait = report["forward_backward_ms"], report["data_wait_ms"]
        # 200 ms of sleep: more would mean rank 1 also counted its wait for rank 0's data
        assert fb["max_rank"] == 1 and 150 < fb["max"] - fb["min"] < 300, fb
        assert wait["max_rank"] == 0 and wait["max"] - wait["min"] > 150, wait
        assert fb["min"] < fb["max"] - 150 and wait["min"] < 100, (fb, wait)
    assert result.stdout.count(" stragglers (ms/step over 2 steps): forward-backward min") == 2
    assert len(re.findall(r"\| max [0-9.]+ \(rank 1 [^)]*\), [0-9.]+x median", result.stdout)) == 2


def test_rank_0_gets_every_ranks_numbers_whatever_order_they_post_in_and_the_store_is_emptied():
    store = torch.distributed.HashStore()
    ranks = [StragglerReport(store, rank, 3, report_count=3) for rank in (2, 0, 1)]  # posting order
    ranks = sorted(ranks, key=lambda report: report.rank)
    for report_index in range(2):
        for rank, report in reversed(list(enumerate(ranks))):  # rank 0 last: it waits for the others
            for _ in range(2):
                report.add(forward_backward_s=(rank + 1 + report_index) / 10, data_wait_s=rank / 1000)
            summary = report.report()
            assert (summary is None) == (rank != 0)
        assert summary["steps"] == 2
        assert [r["rank"] for r in summary["slowest"]] == [2, 1, 0]
        assert abs(summary["forward_backward_ms"]["max"] - 100 * (3 + report_index)) < 1e-9
        assert abs(summary["data_wait_ms"]["max"] - 2.0) < 1e-9
        assert summary["hosts"]["2"] == socket.gethostname()
    assert store.num_keys() == 0


def test_rank_0_waits_for_a_rank_that_has_not_posted_and_says_so():
    store = torch.distributed.HashStore()
    rank0 = StragglerReport(store, 0, 2, report_count=1, wait=datetime.timedelta(seconds=0.2))
    StragglerReport(store, 1, 2, report_count=1)
    rank0.add(0.1, 0.0)
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not post their times for report '0' within 0:00:00.2"):
        rank0.report()
