"""mcode-preflight on a 2-node job simulated on this machine (two torchrun agents under one c10d
rendezvous, 2 ranks each): a GPU made slow on one rank and a node whose all-reduces are slowed
must be named, with the exclude list, and a clean job must pass."""
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_code.plan.measured_links import read_preflight
from megatron_code.preflight.measure import node_pairs, pair_groups
from megatron_code.preflight.report import format_verdict, judge

PROBE = os.path.join(os.path.dirname(__file__), "preflight_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_job(tmp_path, slow_rank: int, slow_node: int) -> tuple[list[subprocess.CompletedProcess], dict]:
    report = str(tmp_path / "preflight.json")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=preflight-test",
           PROBE, str(slow_rank), str(slow_node), "0.02",
           "--gemm-size", "256", "--gemm-iters", "50", "--all-reduce-mib", "0.25", "--slow-fraction", "0.25", "--report", report]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(cmd, agent.returncode, out, err))
    with open(report) as fh:
        return done, json.load(fh)


def test_a_slow_gpu_and_a_slow_node_are_named_and_the_job_fails(tmp_path):
    agents, report = two_node_job(tmp_path, slow_rank=0, slow_node=1)
    assert all(agent.returncode != 0 for agent in agents)  # each rank exits 3
    assert report["nodes"] == [f"{socket.gethostname()}#0", f"{socket.gethostname()}#1"]
    findings = report["findings"]
    assert [f["node"] for f in findings] == [0, 1], findings
    assert findings[0]["what"].startswith("rank 0: GEMM ") and findings[1]["what"].startswith("all-reduce inside the node ")
    assert report["exclude"] == report["nodes"]
    printed = "".join(agent.stdout for agent in agents)
    assert "SLOW (below 25% of the job's median):" in printed
    assert f"sbatch --exclude={socket.gethostname()}#0,{socket.gethostname()}#1" in printed
    assert [len(r["pairs"]) for r in report["ranks"]] == [1, 1, 1, 1]  # one round, each rank its rail


def test_a_job_without_slow_parts_passes(tmp_path):
    agents, report = two_node_job(tmp_path, slow_rank=-1, slow_node=-1)
    assert [agent.returncode for agent in agents] == [0, 0], [a.stderr[-2000:] for a in agents]
    assert report["findings"] == [] and report["exclude"] == []
    assert "verdict: no GPU or node below 25% of the job's median" in "".join(a.stdout for a in agents)
    links = read_preflight(str(tmp_path / "preflight.json"))  # what mcode-plan --network-from takes
    assert links.gpus_per_node == 2 and links.intra_node_bus > 0 and links.inter_node_bus > 0


def test_neighbour_pairs_meet_every_node_twice_on_an_even_ring_and_once_or_twice_on_odd():
    assert node_pairs(2, 0) == [(0, 1)] and node_pairs(4, 1) == [(1, 2), (3, 0)]
    assert node_pairs(5, 0) == [(0, 1), (2, 3)] and node_pairs(5, 1) == [(1, 2), (3, 4)]
    ranks = [[0, 1], [2, 3], [4, 5]]
    assert pair_groups(ranks, 0) == [(0, 1, [0, 2]), (0, 1, [1, 3])]  # local rank to local rank: one rail each


def _result(node, gemm, node_bus, pairs):
    return {"node": node, "gemm_tflops": gemm, "node_bus_gbps": node_bus, "world_bus_gbps": 100.0,
            "pairs": [{"round": r, "nodes": list(nodes), "bus_gbps": gbps} for r, nodes, gbps in pairs]}


def test_a_node_slow_in_both_of_its_pairs_is_blamed_not_its_neighbours():
    """4 nodes x 1 rank: node 2's network is slow, so its pairs (1, 2) and (2, 3) are slow while
    nodes 1 and 3 are fast in their other pairs (0, 1) and (3, 0)."""
    pair_bw = {(0, (0, 1)): 40.0, (0, (2, 3)): 10.0, (1, (1, 2)): 11.0, (1, (3, 0)): 41.0}
    results = [_result(node, 900.0, None, [(r, nodes, bw) for (r, nodes), bw in pair_bw.items() if node in nodes])
               for node in range(4)]
    verdict = judge(results, ["a", "b", "c", "d"], slow_fraction=0.5)
    assert verdict.slow_nodes == ["c"], verdict.findings
    text = format_verdict(verdict, results, 0.5)
    assert "c: all-reduce to neighbour nodes 11 with b, 10 with d GB/s" in text and "--exclude=c " in text


@pytest.mark.parametrize("flags, message", [
    (["--slow-fraction", "1.5"], "--slow-fraction must be in (0, 1), got 1.5"),
    (["--gemm-size", "0"], "--gemm-size must be > 0, got 0"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    from megatron_code.preflight.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_one_process_without_torchrun_measures_its_gemm(tmp_path):
    """As benchmarks/gpu_check.py runs it on a lent GPU: one rank, nothing to compare, exit 0."""
    report = tmp_path / "one.json"
    result = subprocess.run([sys.executable, "-m", "megatron_code.preflight", "--gemm-size", "64", "--report",
                             str(report)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert len(ranks) == 1 and ranks[0]["gemm_tflops"] > 0 and ranks[0]["world_bus_gbps"] is None
    assert "preflight: 1 ranks on 1 node(s) x 1 | cpu" in result.stdout
