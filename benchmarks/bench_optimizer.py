"""The AdamW step alone: torch.optim.AdamW (fused on CUDA, foreach on CPU) against TritonAdamW
(--optimizer-impl triton, kernels/triton_adamw.py), on fp32 parameters shaped like the 7B preset's
(a few layers plus the embedding and output layer), clipping inside the step as the trainer runs it.

    python benchmarks/bench_optimizer.py --device cuda [--layers 4]
    python benchmarks/bench_optimizer.py                 # CPU: torch only (Triton needs CUDA)

"GB/s" counts the 28 bytes per element an AdamW step must move (read parameter, gradient and both
moments; write parameter and moments), plus 2 per copied element in the "+ bf16 copies" rows (the
next training step's bf16 weights: torch's step followed by the casts a step would make, or
TritonAdamW writing them in its pass), over the median step time; "of HBM" divides by the card's
peak bandwidth (megatron_code/plan/hardware.py); "vs torch" compares rows doing the same work.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import seven_b_config, time_steps  # noqa: E402
from megatron_code.model import GPTModel  # noqa: E402
from megatron_code.parallel.fused_wgrad import cached_weight_casts  # noqa: E402
from megatron_code.parallel.grads import clip_in_optimizer_step  # noqa: E402
from megatron_code.plan.hardware import GPUS  # noqa: E402
from megatron_code.training.config import OptimizerConfig  # noqa: E402
from megatron_code.training.optimizer import TritonAdamW, build_optimizer  # noqa: E402

BYTES_PER_ELEMENT = 28
COPY_BYTES_PER_ELEMENT = 2  # the least a bf16 copy adds: its write (a separate cast also reads fp32)
# torch.cuda.get_device_name() substring -> the planner's GPU (first match wins: PCIe before SXM)
HBM_OF = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("A100", "a100"))


def hbm_tb_per_s(device_name: str) -> float | None:
    return next((GPUS[gpu].hbm_tb_per_s for key, gpu in HBM_OF if key in device_name), None)


def model_with_grads(layers: int, device: str) -> GPTModel:
    """gpu_check.py's 7B shape cut to `layers`, with random fp32 gradients, after one short
    training forward that casts its weights (so the cache knows which copies a step wants)."""
    model = GPTModel(seven_b_config(layers, 4096), init_seed=0).to(device)
    with cached_weight_casts(model), torch.autocast(device, dtype=torch.bfloat16):
        model(torch.zeros(1, 16, dtype=torch.long, device=device), labels=torch.zeros(1, 16, dtype=torch.long, device=device))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def cast_wanted(model: GPTModel) -> None:
    """The bf16 casts a training step's first micro-batch makes when no optimizer wrote them."""
    for weight, dtype in model.weight_casts.wanted.values():
        weight.detach().to(dtype)


def step_ms(step, optimizer, device: str, warmup: int, steps: int) -> float:
    """Median ms of step(), clipping (by half) inside the optimizer's step where it can (CUDA)."""
    clip_in_optimizer_step(optimizer, 1.0, torch.full((), 2.0, device=device))
    return 1000 * time_steps(step, warmup, steps, device)


def training_step_part(optimizer, model: GPTModel, copies: bool):
    """What a row times: the optimizer step, and with `copies` the next step's bf16 weights."""
    def step():
        optimizer.step()
        if copies and not isinstance(optimizer, TritonAdamW):
            cast_wanted(model)
    return step


def rows_to_time(device: str) -> list[tuple[str, str, bool]]:
    """(label, --optimizer-impl, whether the step also makes the next step's bf16 weight copies):
    each implementation alone (TritonAdamW also with one launch per parameter), then each with
    the copies (torch's step followed by the casts, TritonAdamW writing them as it updates)."""
    impls = ["torch", "triton"] if device == "cuda" else ["torch"]
    per_parameter = [("triton, a launch per parameter", "triton", False)] if device == "cuda" else []
    return ([(impl, impl, False) for impl in impls] + per_parameter
            + [(f"{impl} + bf16 copies", impl, True) for impl in impls])


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
    copied = sum(w.numel() for w, _ in model.weight_casts.wanted.values())
    hbm = hbm_tb_per_s(torch.cuda.get_device_name(0)) if args.device == "cuda" else None
    print(f"AdamW step, 7B shape x {layers} layers: {numel / 1e9:.2f} B fp32 parameters "
          f"({copied / 1e9:.2f} B cast to bf16 each step), {BYTES_PER_ELEMENT * numel / 1e9:.1f} GB moved per step, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ""))
    print("| implementation | step ms | GB/s | of HBM | vs torch |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for label, impl, copies in rows_to_time(args.device):
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.1, optimizer_impl=impl))
        if isinstance(optimizer, TritonAdamW):
            optimizer.write_weight_copies_for(model if copies else None)
            optimizer.launch_per_parameter = "per parameter" in label
        ms = step_ms(training_step_part(optimizer, model, copies), optimizer, args.device, args.warmup, args.steps)
        moved = BYTES_PER_ELEMENT * numel + (COPY_BYTES_PER_ELEMENT * copied if copies else 0)
        gbps = moved / ms / 1e6
        same_work = next((r for r in rows if r["copies"] == copies), None)
        rows.append({"impl": label, "step_ms": ms, "gb_per_s": gbps, "copies": copies})
        of_hbm = f"{gbps / (hbm * 1000):.0%}" if hbm else "n/a"
        print(f"| {label} ({type(optimizer).__name__}) | {ms:.2f} | {gbps:,.0f} | {of_hbm} | "
              f"{(same_work or rows[-1])['step_ms'] / ms:.2f}x |", flush=True)
        model.weight_casts.prepared.clear()
        optimizer = None  # free the Adam state before the next row's
    return rows


if __name__ == "__main__":
    main()
