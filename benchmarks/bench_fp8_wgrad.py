"""The FP8 weight-gradient GEMM of the 7B layer's four linears, for a micro-batch after a step's
first: `torch._scaled_mm` writing fp32 and then adding it into the fp32 gradient (what autograd
did, and `--fp8-wgrad-impl reference`) against the Triton FP8 GEMM that adds in its epilogue
(kernels/triton_fp8_gemm.py, `--fp8-wgrad-impl triton`), with `_scaled_mm` writing a fresh
gradient (what the step's first micro-batch runs) as the bound neither can beat.

    python benchmarks/bench_fp8_wgrad.py --device cuda [--tokens 4096] [--tp 1]
    python benchmarks/bench_fp8_wgrad.py                   # CPU: small shapes, the torch rows only

Operands as the FP8 linear's backward has them: dY^T [out, tokens] in e5m2 (the hybrid format's
gradients) and x^T [in, tokens] in e4m3, both K-major. "TFLOP/s" counts the GEMM's 2 x out x in x
tokens over the median time; "vs add" compares each row with `_scaled_mm` + add.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.gpu_check import seven_b_config, time_steps  # noqa: E402
from kernels.dispatch import package_imports  # noqa: E402


def layer_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(out, in) of this rank's four FP8 linears of the 7B preset under tensor parallelism tp."""
    c = seven_b_config(1, 4096)
    qkv = (c.num_attention_heads + 2 * c.num_kv_heads) * c.head_dim
    return {"linear_qkv": (qkv // tp, c.hidden_size), "linear_proj": (c.hidden_size, c.hidden_size // tp),
            "linear_fc1 (gate+up)": (2 * c.ffn_hidden_size // tp, c.hidden_size),
            "linear_fc2": (c.hidden_size, c.ffn_hidden_size // tp)}


def variants(grad_t, x_t, scale_a, scale_b, target, device: str) -> dict:
    """label -> what it runs: the gradient of one more micro-batch into `target`."""
    def scaled_mm(out=None):
        return torch._scaled_mm(grad_t, x_t.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32, out=out)

    rows = {"_scaled_mm, then add": lambda: target.add_(scaled_mm()),
            "_scaled_mm, fresh (first micro-batch)": lambda: scaled_mm(out=target)}
    if device == "cuda" and package_imports("triton"):
        from kernels.triton_fp8_gemm import fp8_gemm

        rows["triton, adds in the epilogue"] = lambda: fp8_gemm(target, grad_t, x_t, scale_a, scale_b, True)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (default 4096; CPU 256)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default 1; CPU 8, smaller GEMMs)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    tokens = args.tokens or (4096 if args.device == "cuda" else 256)
    tp = args.tp or (1 if args.device == "cuda" else 8)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"FP8 weight-gradient GEMM of the 7B layer, {tokens} tokens, TP {tp}, device {name}")
    print("| linear | out x in | implementation | ms | TFLOP/s | vs add |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for linear, (out, inp) in layer_shapes(tp).items():
        grad_t = torch.randn(out, tokens, generator=gen).to(torch.float8_e5m2).to(args.device)
        x_t = torch.randn(inp, tokens, generator=gen).to(torch.float8_e4m3fn).to(args.device)
        scale_a, scale_b = (torch.tensor(s, device=args.device) for s in (1e-3, 2e-2))
        target = torch.zeros(out, inp, device=args.device)
        baseline = None
        for label, fn in variants(grad_t, x_t, scale_a, scale_b, target, args.device).items():
            ms = 1000 * time_steps(fn, args.warmup, args.steps, args.device)
            baseline = ms if label.endswith("then add") else baseline
            tflops = 2 * out * inp * tokens / ms / 1e9
            rows.append({"linear": linear, "out": out, "in": inp, "impl": label, "ms": ms, "tflops": tflops})
            ratio = f"{baseline / ms:.2f}x" if baseline else ""
            print(f"| {linear} | {out} x {inp} | {label} | {ms:.3f} | {tflops:,.1f} | {ratio} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
