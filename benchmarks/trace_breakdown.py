"""Where a profiled training step's GPU time goes, from a torch.profiler Chrome trace (the
`trace_rank0.json[.gz]` that `python -m megatron_code.profile --trace-dir` writes).

    python benchmarks/trace_breakdown.py benchmarks/results/2026-11-26_h200_trace_bf16.json.gz --top 15

Prints the traced step's wall time, GPU busy time (kernel durations summed), the kernel count,
GEMM / attention / other kernel time, and the largest "other" kernels grouped by kernel name and
the CPU op that launched them (found through the launch's correlation id and the op enclosing it).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json

GEMM_MARKERS = ("nvjet", "gemm", "cutlass", "sm90_xmma")
ATTENTION_MARKERS = ("sdpa", "fmha", "flash", "cudnn")


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        trace = json.load(fh)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def launching_ops(events: list[dict]):
    """kernel event -> 'op > op > op' (the innermost three CPU ops around its launch)."""
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"}
    ops_by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            ops_by_thread[e["tid"]].append(e)

    def ops_of(kernel: dict) -> str:
        launch = launches.get(kernel["args"].get("correlation"))
        if launch is None:
            return "?"
        around = sorted((op for op in ops_by_thread[launch["tid"]]
                         if op["ts"] <= launch["ts"] and op["ts"] + op["dur"] >= launch["ts"] + launch["dur"]),
                        key=lambda op: op["ts"])
        return " > ".join(op["name"] for op in around[-3:]) or "?"
    return ops_of


def breakdown(events: list[dict], top: int) -> dict:
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    steps = [e["dur"] for e in events if e.get("ph") == "X" and "ProfilerStep" in e.get("name", "")]
    ops_of = launching_ops(events)
    totals, others = collections.Counter(), collections.Counter()
    for k in kernels:
        name = k["name"]
        kind = ("gemm" if any(m in name.lower() for m in GEMM_MARKERS)
                else "attention" if any(m in name.lower() for m in ATTENTION_MARKERS) else "other")
        totals[kind] += k["dur"]
        if kind == "other":
            others[(name[:70], ops_of(k)[:120])] += k["dur"]
    busy = sum(totals.values())
    return {"step_ms": max(steps) / 1e3 if steps else None, "busy_ms": busy / 1e3, "kernels": len(kernels),
            **{f"{kind}_ms": totals[kind] / 1e3 for kind in ("gemm", "attention", "other")},
            "top_other": [(ms / 1e3, name, ops) for (name, ops), ms in others.most_common(top)]}


def format_breakdown(r: dict) -> str:
    step = f"{r['step_ms']:.1f} ms" if r["step_ms"] else "n/a"
    lines = [f"traced step {step} | GPU busy {r['busy_ms']:.1f} ms | {r['kernels']:,} kernels | "
             f"GEMM {r['gemm_ms']:.1f} ms | attention {r['attention_ms']:.1f} ms | other {r['other_ms']:.1f} ms",
             "| ms | kernel | launched by |", "| ---: | --- | --- |"]
    lines += [f"| {ms:.1f} | `{name}` | {ops} |" for ms, name, ops in r["top_other"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="trace_rank0.json or .json.gz")
    parser.add_argument("--top", type=int, default=20, help="how many 'other' kernel groups to list")
    args = parser.parse_args(argv)
    print(format_breakdown(breakdown(load_events(args.trace), args.top)))


if __name__ == "__main__":
    main()
