"""benchmarks/trace_breakdown.py on a hand-written Chrome trace: kernels sorted into GEMM /
attention / other, and each 'other' kernel attributed to the CPU ops around its launch."""
import gzip
import json

from benchmarks.trace_breakdown import breakdown, load_events


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_breakdown_groups_kernels_and_names_their_launching_ops(tmp_path):
    events = [
        _x("user_annotation", "ProfilerStep#3", 0, 1000),
        _x("cpu_op", "aten::linear", 10, 100), _x("cpu_op", "aten::to", 20, 30), _x("cpu_op", "aten::copy_", 25, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 27, 2, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 60, 2, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 70, 2, correlation=3),
        _x("kernel", "void direct_copy_kernel", 100, 40, tid=7, correlation=1),
        _x("kernel", "nvjet_sm90_tst_128x256", 150, 300, tid=7, correlation=2),
        _x("kernel", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 460, 100, tid=7, correlation=3),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    result = breakdown(load_events(str(path)), top=5)
    assert (result["step_ms"], result["kernels"]) == (1.0, 3)
    assert (result["gemm_ms"], result["attention_ms"], result["other_ms"]) == (0.3, 0.1, 0.04)
    assert result["top_other"] == [(0.04, "void direct_copy_kernel", "aten::linear > aten::to > aten::copy_")]
