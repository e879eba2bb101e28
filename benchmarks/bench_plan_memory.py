"""The planner's memory model against real training runs on CPU: predicted vs measured bytes per
rank, by component.

    python benchmarks/bench_plan_memory.py               # all layouts (~2-3 min on 2 cores)
    python benchmarks/bench_plan_memory.py --only "TP2 + SP" --json out.json

Each layout is a real `train()` of the tiny-shaped model on the fixture corpus (fp32, the
plain-torch kernels), one process in-process or a torchrun job. Step 2 is measured
(megatron_code/plan/measure.py: live tensor bytes counted through a TorchDispatchMode, since CPU
has no allocator peak counter and the process RSS is mostly the Python/torch runtime). Measured
"activations" = the peak of live tensor bytes before the optimizer step minus the weights,
gradients and optimizer state held after the step; the prediction is memory.rank_memory for the
same layout with Execution(bf16=False, fused_kernels=False) (bf16 and fp8 as the run has them).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.preprocess_data import preprocess_data  # noqa: E402
from megatron_code.plan.layout import Layout  # noqa: E402
from megatron_code.plan.measure import StepMemoryProbe  # noqa: E402
from megatron_code.plan.hardware import GPUS  # noqa: E402
from megatron_code.plan.memory import Execution, rank_memory  # noqa: E402
from megatron_code.plan.search import PlanRequest, layout_memory  # noqa: E402
from megatron_code.plan.timing import TimeModelConfig  # noqa: E402
from megatron_code.presets import get_preset  # noqa: E402
from megatron_code.tokenizer import SentencePieceTokenizer  # noqa: E402
from megatron_code.training.arguments import run_config_from_values  # noqa: E402
from megatron_code.training.trainer import train  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures")
TOKENIZER = os.path.join(FIXTURES, "code_bpe_2048.model")
COMMON = dict(seq_length=256, micro_batch_size=2, global_batch_size=8, train_iters=2, lr_warmup_iters=1,
              eval_interval=0, log_interval=1000, num_workers=0)
FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
LAYOUTS = [  # (name, processes, overrides)
    ("1 process", 1, {}),
    ("1 process, full recompute", 1, FULL),
    ("1 process, bf16 autocast", 1, dict(bf16=True)),
    ("TP2 + SP", 2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    ("TP2 + SP, selective", 2, dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                    recompute_granularity="selective")),
    ("PP2 1f1b", 2, dict(pipeline_model_parallel_size=2)),
    ("DP2", 2, {}),
    ("DP2 + ZeRO-1", 2, dict(use_distributed_optimizer=True)),
    ("CP2", 2, dict(context_parallel_size=2)),
    ("1 process, FP8", 1, dict(fp8_format="hybrid")),
    ("1 process, FP8, bf16 autocast", 1, dict(fp8_format="hybrid", bf16=True)),
    ("TP2 + SP, FP8", 2, dict(tensor_model_parallel_size=2, sequence_parallel=True, fp8_format="hybrid")),
    # DPO on synthetic conversations: micro-batches of 2 pairs (4 sequences) beside the frozen
    # reference, whose weights the "weights" columns include.
    ("DPO, 1 process", 1, dict(training_mode="dpo", data_path=[], mock_data=True)),
    ("DPO, 1 process, bf16 autocast", 1, dict(training_mode="dpo", data_path=[], mock_data=True, bf16=True)),
]
MIB = 2**20


def layout_of(values: dict, processes: int) -> Layout:
    tp, pp = values.get("tensor_model_parallel_size", 1), values.get("pipeline_model_parallel_size", 1)
    cp = values.get("context_parallel_size", 1)
    return Layout(tp, pp, 1, cp, processes // (tp * pp * cp), values["micro_batch_size"],
                  values.get("use_distributed_optimizer", False), values.get("recompute_granularity"),
                  values.get("recompute_method"), values.get("recompute_num_layers"))


def predict(values: dict, processes: int, pp_rank: int) -> dict:
    cfg = run_config_from_values(values)
    cfg.model.vocab_size = SentencePieceTokenizer(TOKENIZER).vocab_size
    layout = layout_of(values, processes)
    execution = Execution(bf16=values.get("bf16", False), fused_kernels=False, fp8=values.get("fp8_format") is not None)
    if cfg.training.training_mode == "dpo":  # pairs as sequences plus the reference (no PP in DPO)
        request = PlanRequest(model=cfg.model, gpus=processes, gpu=GPUS["h100-sxm"], seq_length=cfg.data.seq_length,
                              global_batch_size=cfg.training.global_batch_size, execution=execution,
                              training_mode="dpo")
        estimate = layout_memory(request, layout, TimeModelConfig())
    else:
        estimate = rank_memory(layout.model_config(cfg.model), layout, cfg.data.seq_length,
                               cfg.training.global_batch_size, pp_rank, cfg.model.padded_vocab_size(layout.tp),
                               execution)
    return {"weights": estimate.weights + estimate.reference, "grads": estimate.grads,
            "optimizer": estimate.optimizer, "activations": estimate.activations, "total": estimate.total}


def measured(result: dict) -> dict:
    weights = result["weights"] + result["reference"]  # DPO's frozen reference (0 otherwise)
    static = weights + result["grads"] + result["optimizer"]
    return {"weights": weights, "grads": result["grads"], "optimizer": result["optimizer"],
            "activations": result["peak_before_step"] - static, "total": result["peak_before_step"],
            "optimizer_step_peak": result["peak_in_step"]}


def worker(values_json: str, out_dir: str) -> None:
    """One rank of a torchrun job: train with the probe, write this rank's result."""
    probe = StepMemoryProbe()
    train(run_config_from_values(json.loads(values_json)), prepare=probe)
    with open(os.path.join(out_dir, f"rank{probe.result['rank']}.json"), "w") as fh:
        json.dump(probe.result, fh)


def run_layout(processes: int, values: dict, workdir: str) -> list[dict]:
    if processes == 1:
        probe = StepMemoryProbe()
        train(run_config_from_values(values), prepare=probe)
        return [probe.result]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           os.path.abspath(__file__), "--worker", json.dumps(values), workdir]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    files = sorted(f for f in os.listdir(workdir) if f.startswith("rank"))
    if len(files) != processes:
        raise RuntimeError(f"layout failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return [json.load(open(os.path.join(workdir, f))) for f in files]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="names of layouts to run (default: all)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("VALUES_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    rows = []
    print(f"{'layout':32} {'rank':>4} | {'MiB predicted / measured':^60} | {'total':>7}")
    print(f"{'':32} {'':>4} | {'weights':>14} {'grads':>14} {'optimizer':>14} {'activations':>15} | {'error':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        data = preprocess_data(os.path.join(FIXTURES, "stdlib_sample.jsonl"), TOKENIZER, os.path.join(tmp, "sample"),
                               progress=False).outputs["text"]
        for name, processes, overrides in LAYOUTS:
            if args.only and name not in args.only:
                continue
            values = {**get_preset("tiny"), **COMMON, "data_path": [data], "tokenizer_model": TOKENIZER, **overrides}
            with tempfile.TemporaryDirectory(dir=tmp) as workdir:
                results = run_layout(processes, values, workdir)
            for result in sorted(results, key=lambda r: r["rank"]):
                row = {"layout": name, "rank": result["rank"], "predicted": predict(values, processes, result["pp_rank"]),
                       "measured": measured(result)}
                rows.append(row)
                print(_format(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def _format(row: dict) -> str:
    p, m = row["predicted"], row["measured"]
    cells = " ".join(f"{p[k] / MIB:6.2f}/{m[k] / MIB:<6.2f}" + ("" if k != "activations" else " ")
                     for k in ("weights", "grads", "optimizer", "activations"))
    return f"{row['layout']:32} {row['rank']:>4} | {cells} | {100 * (p['total'] / m['total'] - 1):+6.1f}%"


if __name__ == "__main__":
    main()
