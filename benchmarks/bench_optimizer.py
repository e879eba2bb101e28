"""The AdamW step alone: torch.optim.AdamW (fused on CUDA, foreach on CPU) against TritonAdamW
(--optimizer-impl triton, kernels/triton_adamw.py), on fp32 parameters shaped like the 7B preset's
(a few layers plus the embedding and output layer), clipping inside the step as the trainer runs it.

    python benchmarks/bench_optimizer.py --device cuda [--layers 4]
    python benchmarks/bench_optimizer.py                 # CPU: torch only (Triton needs CUDA)

"GB/s" counts the 28 bytes per element an AdamW step must move (read parameter, gradient and both
moments; write parameter and moments) over the median step time; "of HBM" divides by the card's
peak bandwidth (megatron_code/plan/hardware.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import seven_b_config  # noqa: E402
from megatron_code.model import GPTModel  # noqa: E402
from megatron_code.parallel.grads import clip_in_optimizer_step  # noqa: E402
from megatron_code.plan.hardware import GPUS  # noqa: E402
from megatron_code.training.config import OptimizerConfig  # noqa: E402
from megatron_code.training.optimizer import adamw, parameter_groups  # noqa: E402

BYTES_PER_ELEMENT = 28
# torch.cuda.get_device_name() substring -> the planner's GPU (first match wins: PCIe before SXM)
HBM_OF = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("A100", "a100"))


def hbm_tb_per_s(device_name: str) -> float | None:
    return next((GPUS[gpu].hbm_tb_per_s for key, gpu in HBM_OF if key in device_name), None)


def model_with_grads(layers: int, device: str) -> GPTModel:
    """gpu_check.py's 7B shape cut to `layers`, with random fp32 gradients."""
    model = GPTModel(seven_b_config(layers, 4096), init_seed=0).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def step_ms(optimizer, device: str, warmup: int, steps: int) -> float:
    """Median ms of one step, clipping (by half) inside it where the optimizer can (CUDA)."""
    clip_in_optimizer_step(optimizer, 1.0, torch.full((), 2.0, device=device))
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=None, help="default: 4 on CUDA, 1 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    layers = args.layers or (4 if args.device == "cuda" else 1)
    model = model_with_grads(layers, args.device)
    numel = sum(p.numel() for p in model.parameters())
    impls = ["torch", "triton"] if args.device == "cuda" else ["torch"]
    hbm = hbm_tb_per_s(torch.cuda.get_device_name(0)) if args.device == "cuda" else None
    print(f"AdamW step, 7B shape x {layers} layers: {numel / 1e9:.2f} B fp32 parameters, "
          f"{BYTES_PER_ELEMENT * numel / 1e9:.1f} GB moved per step, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    print("| implementation | step ms | GB/s | of HBM | vs torch |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for impl in impls:
        optimizer = adamw(parameter_groups(model, 0.1), OptimizerConfig(lr=1e-4, optimizer_impl=impl),
                          args.device == "cuda")
        ms = step_ms(optimizer, args.device, args.warmup, args.steps)
        gbps = BYTES_PER_ELEMENT * numel / ms / 1e6
        rows.append({"impl": impl, "step_ms": ms, "gb_per_s": gbps})
        of_hbm = f"{gbps / (hbm * 1000):.0%}" if hbm else "n/a"
        print(f"| {impl} ({type(optimizer).__name__}) | {ms:.2f} | {gbps:,.0f} | {of_hbm} | "
              f"{rows[0]['step_ms'] / ms:.2f}x |", flush=True)
        del optimizer
    return rows


if __name__ == "__main__":
    main()
