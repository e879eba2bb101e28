"""Fused kernels against the torch code they replace: forward + backward time per kernel, memory
bandwidth (or GEMM throughput for the loss head) and the extra memory each variant needs.

    python benchmarks/bench_kernels.py                  # CPU: the reference path vs the unfused torch code
    python benchmarks/bench_kernels.py --device cuda    # + Triton and torch.compile'd torch code (< 60 s)

Variants: "unfused torch" is the model's code before the fused kernels (two RoPE calls, F.silu * up,
full logits + cross-entropy); "reference" is the dispatcher's plain-torch path ("auto" on CPU);
"compiled" is torch.compile of the unfused torch code; "triton" the Triton kernels. "fwd+bwd ms"
is wall time (median), "GPU kernels ms" the profiler's device time of the same work (on CUDA; short
kernels leave the GPU idle while Python launches the next one, which training hides behind the
big GEMMs). GB/s counts the bytes a fused forward + backward must move (inputs read, outputs
written, once each) over the GPU time; the loss head is GEMM-bound, so it reports TFLOP/s of the
6 N V h useful FLOPs instead. "extra MiB" is
the peak of memory allocated during forward + backward beyond the inputs (CUDA allocator
statistics; on CPU, live tensor storages counted by a dispatch mode).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_unfused  # noqa: E402
from kernels.weighted_linear_cross_entropy import weighted_linear_cross_entropy  # noqa: E402
from kernels.rmsnorm import add_rms_norm, rms_norm, rms_norm_reference  # noqa: E402
from kernels.rotary import apply_rotary_emb_qk, apply_rotary_emb_reference, split_qkv_rotary  # noqa: E402
from kernels.swiglu import swiglu, swiglu_halves, swiglu_reference  # noqa: E402
from kernels.fp8_linear import Fp8LinearScaling, Fp8Weight, fp8_linear  # noqa: E402
from kernels.fp8_mlp import fp8_swiglu_mlp  # noqa: E402
from kernels.fp8_scaling import ScalingConfig  # noqa: E402

# Per device: rows/tokens, hidden, heads (q, kv), head dim, FFN, vocabulary, loss-head tokens, activation dtype,
# and optionally a vocabulary chunk smaller than the default block (shows the loss head's memory trade-off).
SHAPES = {
    "cpu": dict(tokens=2048, hidden=1024, heads=(8, 2), head_dim=64, ffn=2816, vocab=8192, ce_tokens=1024,
                dtype=torch.float32, small_vocab_chunk=1024),
    "cuda": dict(tokens=8192, hidden=4096, heads=(32, 8), head_dim=128, ffn=14336, vocab=128256, ce_tokens=8192,
                 dtype=torch.bfloat16),
}


@dataclass
class Case:
    """One kernel: how to build its inputs and the variants that compute the same thing."""

    name: str
    shape: str
    make_inputs: Callable[[], tuple]
    variants: dict[str, Callable]
    bytes_moved: int = 0
    """Minimum forward + backward traffic, for the GB/s column (0: GEMM-bound, report TFLOP/s)."""
    flops: int = 0
    compiled: Callable | None = field(default=None)
    """The unfused torch code to hand to torch.compile."""
    unit_output_grads: bool = False
    """Backward from gradient 1 (a loss), not a random output gradient."""


def _rope_unfused(q, k, cos, sin):
    return apply_rotary_emb_reference(q, cos, sin), apply_rotary_emb_reference(k, cos, sin)


def _split_rope_unfused(grouped, cos, sin):
    """The attention's code before the fused split: slice copies of q, k, v, then RoPE on q and k."""
    s, b, groups, width, d = grouped.shape
    q = grouped[:, :, :, :width - 2].reshape(s, b, groups * (width - 2), d)
    k, v = grouped[:, :, :, width - 2], grouped[:, :, :, width - 1].contiguous()
    return apply_rotary_emb_reference(q, cos, sin), apply_rotary_emb_reference(k, cos, sin), v


def _add_norm_unfused(x, delta, w):
    h = x + delta
    return h, rms_norm_reference(h, w, 1e-5)


def _swiglu_halves_unfused(gate_up):
    return swiglu_reference(*gate_up.chunk(2, dim=-1))


def fused_layout_cases(device: torch.device, s: dict, leaf, rope_tables) -> list[Case]:
    """Kernels that read a layer's tensors in the layout the GEMMs write them (QKV split + RoPE,
    SwiGLU on the gate/up output) or fuse the residual add into the norm."""
    n, h, dtype, (nq, nkv), d = s["tokens"], s["hidden"], s["dtype"], s["heads"], s["head_dim"]
    size, ffn, q_per = torch.finfo(dtype).bits // 8, s["ffn"], nq // nkv
    return [
        Case("QKV split + RoPE", f"grouped [{n // 2}, 2, {nkv}, {q_per + 2}, {d}] {dtype}",
             lambda: (leaf(n // 2, 2, nkv, q_per + 2, d), *rope_tables()), {
                 "unfused torch": _split_rope_unfused,
                 "reference": lambda t, c, s_: split_qkv_rotary(t, c, s_, "reference"),
                 "triton": lambda t, c, s_: split_qkv_rotary(t, c, s_, "triton"),
             }, bytes_moved=4 * n * (nq + 2 * nkv) * d * size, compiled=_split_rope_unfused),
        Case("add + RMSNorm", f"[{n}, {h}] {dtype}", lambda: (leaf(n, h), leaf(n, h), leaf(h, dt=torch.float32)), {
            "unfused torch": _add_norm_unfused,
            "reference": lambda x, r, w: add_rms_norm(x, r, w, 1e-5, "reference"),
            "triton": lambda x, r, w: add_rms_norm(x, r, w, 1e-5, "triton"),
        }, bytes_moved=8 * n * h * size, compiled=_add_norm_unfused),
        Case("SwiGLU on gate|up", f"[{n}, 2 x {ffn}] {dtype}", lambda: (leaf(n, 2 * ffn),), {
            "unfused torch": _swiglu_halves_unfused,
            "reference": lambda t: swiglu_halves(t, "reference"),
            "triton": lambda t: swiglu_halves(t, "triton"),
        }, bytes_moved=8 * n * ffn * size, compiled=_swiglu_halves_unfused),
    ]


def build_cases(device: torch.device, s: dict) -> list[Case]:
    n, h, dtype, (nq, nkv), d = s["tokens"], s["hidden"], s["dtype"], s["heads"], s["head_dim"]
    size = torch.finfo(dtype).bits // 8

    def leaf(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, device=device)).to(dt).requires_grad_()

    def rope_tables():
        angles = torch.rand(n // 2, 2, 1, d, device=device) * 100
        return angles.cos(), angles.sin()

    def rope_inputs():
        return leaf(n // 2, 2, nq, d), leaf(n // 2, 2, nkv, d), *rope_tables()

    vocab, ce_tokens = s["vocab"], s["ce_tokens"]
    ce_inputs = lambda: (leaf(ce_tokens, h, dt=torch.float32),  # noqa: E731
                         leaf(vocab, h, scale=0.02, dt=torch.float32),
                         torch.randint(0, vocab - 128, (ce_tokens,), device=device))
    ce = dict(vocab_size=vocab - 128)

    def under_autocast(fn):
        """fp32 master hidden/weight with the GEMMs in the activation dtype, as the model trains."""
        def run(*inputs):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return fn(*inputs)
        return run
    return [
        Case("RMSNorm", f"[{n}, {h}] {dtype}", lambda: (leaf(n, h), leaf(h, dt=torch.float32)), {
            "unfused torch": lambda x, w: rms_norm_reference(x, w, 1e-5),
            "reference": lambda x, w: rms_norm(x, w, 1e-5, "reference"),
            "triton": lambda x, w: rms_norm(x, w, 1e-5, "triton"),
        }, bytes_moved=5 * n * h * size, compiled=lambda x, w: rms_norm_reference(x, w, 1e-5)),
        Case("RoPE q+k", f"q [{n // 2}, 2, {nq}, {d}], k [.., {nkv}, {d}] {dtype}", rope_inputs, {
            "unfused torch": _rope_unfused,
            "reference": lambda q, k, c, s: apply_rotary_emb_qk(q, k, c, s, "reference"),
            "triton": lambda q, k, c, s: apply_rotary_emb_qk(q, k, c, s, "triton"),
        }, bytes_moved=4 * n * (nq + nkv) * d * size, compiled=_rope_unfused),
        Case("SwiGLU", f"[{n}, {s['ffn']}] {dtype}", lambda: (leaf(n, s["ffn"]), leaf(n, s["ffn"])), {
            "unfused torch": swiglu_reference,
            "reference": lambda g, u: swiglu(g, u, "reference"),
            "triton": lambda g, u: swiglu(g, u, "triton"),
        }, bytes_moved=8 * n * s["ffn"] * size, compiled=swiglu_reference),
        Case("linear + CE", f"N {ce_tokens}, h {h}, V {vocab} (128 padded), {dtype} GEMMs", ce_inputs, {
            "unfused torch": under_autocast(lambda x, w, t: linear_cross_entropy_unfused(x, w, t, **ce)),
            "reference": under_autocast(lambda x, w, t: linear_cross_entropy(x, w, t, **ce, impl="reference")),
            "triton": under_autocast(lambda x, w, t: linear_cross_entropy(x, w, t, **ce, impl="triton")),
            **small_chunk_variant(s, ce, under_autocast),
        }, flops=6 * ce_tokens * vocab * h,
            compiled=under_autocast(lambda x, w, t: linear_cross_entropy_unfused(x, w, t, **ce))),
        weighted_loss_case(device, s, ce_inputs, ce, under_autocast),
        *fused_layout_cases(device, s, leaf, rope_tables),
        fp8_mlp_case(device, s, leaf, under_autocast),
    ]


def fp8_mlp_case(device: torch.device, s: dict, leaf, under_autocast) -> Case:
    """The MLP's GEMMs in FP8 (delayed scaling, fp32 master weights under autocast): two FP8 linears
    around the SwiGLU ("unfused torch": the activation and the gate/up gradient pass through the
    activation dtype and a cast, `--no-fp8-fused-swiglu`) against kernels/fp8_mlp.py, where the
    SwiGLU writes them in FP8. Each variant keeps its scales across calls: after the warm-up they
    are delayed scales, as in training."""
    n, h, ffn = s["tokens"], s["hidden"], s["ffn"]

    def scales():
        return Fp8LinearScaling(ScalingConfig()), Fp8LinearScaling(ScalingConfig())

    def unfused():
        fc1, fc2 = scales()
        return under_autocast(lambda x, w1, w2: fp8_linear(swiglu_halves(fp8_linear(x, w1, fc1)), w2, fc2))

    def fused(impl):
        fc1, fc2 = scales()
        return under_autocast(lambda x, w1, w2: fp8_swiglu_mlp(
            x, Fp8Weight(w1, fc1, None, False), Fp8Weight(w2, fc2, None, False), impl))

    return Case("FP8 SwiGLU MLP", f"x [{n}, {h}], FFN {ffn}, FP8 GEMMs (hybrid, delayed)",
                lambda: (leaf(n, h), leaf(2, ffn, h, scale=0.02, dt=torch.float32),
                         leaf(h, ffn, scale=0.02, dt=torch.float32)),
                {"unfused torch": unfused(), "reference": fused("reference"), "triton": fused("triton")},
                flops=18 * n * ffn * h)


def weighted_loss_case(device: torch.device, s: dict, ce_inputs, ce: dict, under_autocast) -> Case:
    """The trainer's loss, sum_n w_n CE_n: the per-token heads weighted afterwards (the fused one
    recomputes its logits in backward) against the head given the weights, which makes its
    gradients in the forward (kernels/weighted_linear_cross_entropy.py)."""
    tokens, vocab, h = s["ce_tokens"], s["vocab"], s["hidden"]

    def inputs():
        return *ce_inputs(), torch.rand(tokens, device=device) / tokens

    def weighted_after(impl):
        return under_autocast(lambda x, w, t, lw: (linear_cross_entropy(x, w, t, **ce, impl=impl) * lw).sum())

    def in_forward(impl):
        return under_autocast(lambda x, w, t, lw: weighted_linear_cross_entropy(x, w, t, lw, **ce, impl=impl)[0])

    unfused = under_autocast(lambda x, w, t, lw: (linear_cross_entropy_unfused(x, w, t, **ce) * lw).sum())
    return Case("linear + CE, weighted loss", f"N {tokens}, h {h}, V {vocab} (128 padded), {s['dtype']} GEMMs",
                inputs, {"unfused torch": unfused, "reference": weighted_after("reference"),
                         "reference, grads in forward": in_forward("reference"), "triton": weighted_after("triton"),
                         "triton, grads in forward": in_forward("triton")},
                flops=6 * tokens * vocab * h, compiled=unfused, unit_output_grads=True)


def small_chunk_variant(s: dict, ce: dict, under_autocast) -> dict:
    chunk = s.get("small_vocab_chunk")
    if chunk is None:
        return {}
    return {f"reference, {chunk}-row vocab chunks": under_autocast(
        lambda x, w, t: linear_cross_entropy(x, w, t, **ce, impl="reference", chunk_vocab=chunk))}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (CPU has no allocator statistics).
    Frees are noticed at the next op, which is when a caching allocator would reuse the memory."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def forward_backward(fn, inputs, grads) -> None:
    for x in inputs:
        x.grad = None
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grads)


def output_grads(fn, inputs) -> tuple:
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return tuple(torch.randn_like(out) for out in outputs)


def timed_ms(fn, inputs, grads, device) -> float:
    """Wall time of one forward + backward (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward_backward(fn, inputs, grads)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    forward_backward(fn, inputs, grads)
    return 1e3 * (time.perf_counter() - t0)


def extra_mib(fn, inputs, grads, device) -> float:
    """Peak memory allocated during one forward + backward beyond what existed before."""
    for x in inputs:
        x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward(fn, inputs, grads)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with LiveTensorBytes() as tracker:
        forward_backward(fn, inputs, grads)
    return tracker.peak / 2**20


def kernel_ms(fn, inputs, grads, iters: int) -> float:
    """GPU time of the kernels of one forward + backward (the profiler's device time), free of the
    host-side launch overhead that wall time includes when kernels are short."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward_backward(fn, inputs, grads)
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e3 / iters


@dataclass
class Run:
    """One variant, ready to time: its function, inputs and fixed output gradients."""

    label: str
    fn: Callable
    inputs: tuple
    grads: tuple
    times: list = field(default_factory=list)


def prepare(case: Case, variants: dict[str, Callable], device, warmup: int) -> tuple[list[Run], list[dict]]:
    """Warm-up (compilation, autotuning, allocator) for each variant, all on the same input and
    output-gradient tensors (on CPU, where a tensor happens to live in memory alone moves timings
    by ~20%); a variant that fails becomes an error row instead of stopping the others."""
    inputs = case.make_inputs()
    grads = output_grads(next(iter(variants.values())), inputs)
    if case.unit_output_grads:
        grads = tuple(torch.ones_like(g) for g in grads)
    runs, errors = [], []
    for label, fn in variants.items():
        try:
            run = Run(label, fn, inputs, grads)
            for _ in range(warmup):
                forward_backward(run.fn, run.inputs, run.grads)
            runs.append(run)
        except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others' numbers
            errors.append(dict(variant=label, error=f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"))
    return runs, errors


def measure_case(case: Case, variants: dict[str, Callable], device, args) -> list[dict]:
    """Times the variants interleaved (alternating order each round), so load changes on a shared
    machine and allocator warm-up hit all of them alike; then GPU time and memory per variant."""
    runs, rows = prepare(case, variants, device, args.warmup)
    for round_index in range(args.iters):
        for run in runs if round_index % 2 == 0 else reversed(runs):
            run.times.append(timed_ms(run.fn, run.inputs, run.grads, device))
    for run in runs:
        ms = statistics.median(run.times)
        gpu_ms = kernel_ms(run.fn, run.inputs, run.grads, args.iters) if device.type == "cuda" else None
        busy = gpu_ms or ms
        rate = case.bytes_moved / busy / 1e6 if case.bytes_moved else case.flops / busy / 1e9
        rows.append(dict(variant=run.label, ms=ms, gpu_ms=gpu_ms, rate=rate,
                         mib=extra_mib(run.fn, run.inputs, run.grads, device)))
    return sorted(rows, key=lambda row: list(variants).index(row["variant"]))


def variants_for(case: Case, device, args) -> dict[str, Callable]:
    chosen = {k: v for k, v in case.variants.items() if not k.startswith("triton") or device.type == "cuda"}
    if device.type == "cuda" and not args.no_compile and case.compiled is not None:
        chosen["compiled"] = torch.compile(case.compiled)
    return chosen


def print_table(case: Case, rows: list[dict]) -> None:
    unit = "GB/s" if case.bytes_moved else "TFLOP/s"
    base = next((r["ms"] for r in rows if r["variant"] == "unfused torch" and "ms" in r), None)
    print(f"\n{case.name}: {case.shape}")
    print(f"| variant | fwd+bwd ms | GPU kernels ms | {unit} | extra MiB | vs unfused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        speed = f"{base / r['ms']:.2f}x" if base else "-"
        gpu = f"{r['gpu_ms']:.3f}" if r["gpu_ms"] is not None else "-"
        print(f"| {r['variant']} | {r['ms']:.2f} | {gpu} | {r['rate']:.3g} | {r['mib']:.0f} | {speed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (CUDA)")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="only these (RMSNorm, RoPE, SwiGLU, linear, FP8): case names starting so")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here.")
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"# bench_kernels {datetime.date.today()} | {device_name(device)} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()}")
    for case in build_cases(device, SHAPES[args.device]):
        if args.kernels and not any(case.name.lower().startswith(k.lower()) for k in args.kernels):
            continue
        print_table(case, measure_case(case, variants_for(case, device, args), device, args))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import triton

        return f"{torch.cuda.get_device_name()} | triton {triton.__version__}"
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
