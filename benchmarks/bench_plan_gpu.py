"""The planner's models against one real GPU (H100/H200): run by hand where a GPU is available.

    python benchmarks/bench_plan_gpu.py --json plan_gpu.json

1. One 7B-shaped layer (bf16 autocast, the kernels `auto` picks on CUDA): the bytes autograd
   saves for backward, against activations.layer_bytes (fused kernels), without and with
   selective recompute; and which SDPA kernel ran.
2. A 7B-width model with --layers layers (untied 49,152-token vocabulary) trained for a few steps
   of 2 micro-batches with fused AdamW: the peak allocated memory of a step
   (torch.cuda.max_memory_allocated) against memory.estimate_memory, and the forward/backward
   time against timing's compute term at 100% of peak, which gives the compute efficiency the
   planner assumes. For recompute none / selective / full.
3. One tensor-parallel rank's compute for TP = 1, 2, 4, 8 (the model built with a TP-sized
   ParallelState in one process: the shapes one rank multiplies, no communication): the compute
   efficiency at the GEMM widths each TP size leaves.
4. Context-parallel attention as our SDPA backend runs it (this rank's s/CP queries, the whole
   sequence's K/V, the explicit causal mask): kernel, saved bytes, peak memory.
Needs only torch (+ triton): not megatron-core.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_code.model import GPTModel  # noqa: E402
from megatron_code.model.config import ModelConfig  # noqa: E402
from megatron_code.model.core_attention import SDPAttention  # noqa: E402
from megatron_code.model.gpt import TransformerLayer  # noqa: E402
from megatron_code.model.rope import RotaryEmbedding  # noqa: E402
from megatron_code.parallel.context import context_parallel_mask, local_chunks  # noqa: E402
from megatron_code.parallel.state import ParallelState  # noqa: E402
from megatron_code.plan import activations as act  # noqa: E402
from megatron_code.plan.layout import Layout  # noqa: E402
from megatron_code.plan.memory import estimate_memory  # noqa: E402
from megatron_code.plan.timing import TimeModelConfig, estimate_time  # noqa: E402
from megatron_code.plan.hardware import GPUS  # noqa: E402
from megatron_code.training.config import OptimizerConfig  # noqa: E402
from megatron_code.training.optimizer import build_optimizer  # noqa: E402

SHAPE_7B = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, group_query_attention=True,
                num_query_groups=8, vocab_size=49152, untie_embeddings_and_output_weights=True,
                max_position_embeddings=131072)
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
GIB = 2**30


def backward_node_names(output: torch.Tensor) -> set[str]:
    """Class names of the autograd nodes behind `output` (which kernels and functions ran)."""
    seen, stack, names = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def saved_bytes(fn, exclude) -> tuple[int, list[str]]:
    """Bytes of the distinct storages autograd saves while running fn(), minus `exclude`'s, and
    the autograd node names seen (to tell which SDPA kernel ran)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    names = backward_node_names(out)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    return sum(v for k, v in storages.items() if k not in skip), sorted(n for n in names if "ttention" in n)


def layer_check(seq: int) -> list[dict]:
    rows = []
    for name in ("none", "selective"):
        config = ModelConfig(num_layers=1, **SHAPE_7B, **RECOMPUTE[name])
        layer = TransformerLayer(config).cuda()
        x = torch.randn(seq, 1, config.hidden_size, device="cuda", requires_grad=True)
        cos, sin = RotaryEmbedding(config).cuda()(torch.arange(seq, device="cuda")[None])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, kernels = saved_bytes(functools.partial(layer, x, cos, sin), [*layer.parameters(), cos, sin])
        gemm_weights = sum(p.numel() for p in layer.parameters() if p.dim() > 1)  # autocast's bf16 copies
        want = act.layer_bytes(config, act.MicroBatch(1, seq), recompute_core=name == "selective")
        rows.append(dict(check="layer", recompute=name, seq=seq, saved_bytes=got,
                         predicted=want + 2 * gemm_weights, attention_nodes=kernels))
    return rows


def train_steps(model: GPTModel, optimizer, tokens: torch.Tensor, steps: int) -> tuple[float, int]:
    """Median forward/backward seconds of 2 micro-batches and the peak allocated bytes of a step
    (fused AdamW included), over the steps after the first."""
    times, peaks = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        optimizer.zero_grad(set_to_none=True)
        start.record()
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens, labels=tokens).mean()
            loss.backward()
        end.record()
        optimizer.step()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
        peaks.append(torch.cuda.max_memory_allocated())
    return statistics.median(times[1:]), max(peaks[1:])


def ideal_compute_seconds(config: ModelConfig, layout: Layout, seq: int) -> float:
    """timing's compute term at 100% of the dense BF16 peak (989 TFLOP/s: H100 SXM = H200)."""
    vocab = config.padded_vocab_size(layout.tp)
    return estimate_time(config, layout, seq, 2 * layout.micro_batch_size, vocab, GPUS["h100-sxm"],
                         TimeModelConfig(compute_efficiency=1.0)).compute


def model_check(layers: int, seq: int, micro_batch: int, steps: int) -> list[dict]:
    base = ModelConfig(num_layers=layers, **SHAPE_7B)
    model = GPTModel(base).cuda()
    optimizer = build_optimizer(model, OptimizerConfig())
    tokens = torch.randint(0, 49152, (micro_batch, seq), device="cuda")
    rows = []
    for name, recompute in RECOMPUTE.items():
        config = base.replace(**recompute)
        _set_recompute(model, config)
        seconds, peak = train_steps(model, optimizer, tokens, steps)
        layout = Layout(1, 1, 1, 1, 1, micro_batch, False, config.recompute_granularity, config.recompute_method,
                        config.recompute_num_layers)
        memory = estimate_memory(config, layout, seq, 2 * micro_batch, config.padded_vocab_size(1))
        rows.append(dict(check="model", recompute=name, layers=layers, seq=seq, micro_batch=micro_batch,
                         peak_bytes=peak, predicted_bytes=memory.total,
                         predicted=dict(weights=memory.weights, grads=memory.grads, optimizer=memory.optimizer,
                                        activations=memory.activations),
                         fwd_bwd_s=seconds, compute_efficiency=ideal_compute_seconds(config, layout, seq) / seconds))
    del model, optimizer
    return rows


def tensor_parallel_check(layers: int, seq: int, micro_batch: int, steps: int, tp: int) -> dict:
    config = ModelConfig(num_layers=layers, **SHAPE_7B)
    model = GPTModel(config, ParallelState(tp=tp)).cuda()
    optimizer = build_optimizer(model, OptimizerConfig())
    tokens = torch.randint(0, 49152, (micro_batch, seq), device="cuda")
    seconds, peak = train_steps(model, optimizer, tokens, steps)
    layout = Layout(tp, 1, 1, 1, 1, micro_batch, False)
    return dict(check="tp-rank", tp=tp, layers=layers, seq=seq, micro_batch=micro_batch, fwd_bwd_s=seconds,
                peak_bytes=peak, compute_efficiency=ideal_compute_seconds(config, layout, seq) / seconds)


def _set_recompute(model: GPTModel, config: ModelConfig) -> None:
    """Switch recompute on an existing model (what the constructor sets from the config), so the
    three variants share one 1.3B-parameter initialization."""
    model.decoder.recompute_method = config.recompute_method
    model.decoder.recompute_num_layers = config.recompute_num_layers
    for layer in model.decoder.layers.values():
        layer.self_attention.recompute_core_attention = config.recompute_granularity == "selective"


def context_parallel_check(seq: int, cp: int) -> dict:
    """Bytes CP attention keeps beyond q/k/v on rank 0 (no document masks): the planner predicts
    activations.cp_mask_bytes of them, 0 on CUDA (bottom-right causal chunks run in the flash kernel)."""
    config = ModelConfig(num_layers=1, **SHAPE_7B)
    local, d = seq // cp, config.head_dim
    chunks = local_chunks(seq, cp, 0, "cuda")
    q = torch.randn(local, 1, 32, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(seq, 1, 8, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    attention = SDPAttention(config)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        got, kernels = saved_bytes(functools.partial(attention, q, k, v, None, chunks), [q, k, v])
        error = None
    except RuntimeError as exc:  # e.g. out of memory on a math fallback
        got, kernels, error = None, [], str(exc)[:300]
    predicted = act.cp_mask_bytes(act.MicroBatch(1, seq, context_parallel=cp, fused_kernels=True))
    return dict(check="cp-attention", seq=seq, cp=cp, saved_bytes_beyond_qkv=got, predicted_mask_bytes=predicted,
                peak_delta_bytes=torch.cuda.max_memory_allocated() - base, attention_nodes=kernels, error=error,
                explicit_mask_bytes=context_parallel_mask(chunks.indices, seq, None).numel())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_plan_gpu.py needs a CUDA GPU.")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    # One process group of one rank: the unfused vocab-parallel loss all-reduces over the default group.
    torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1)
    rows = layer_check(4096)
    for seq, micro_batch in ((4096, 1), (4096, 2), (8192, 1)):
        rows += model_check(args.layers, seq, micro_batch, args.steps)
    rows += [tensor_parallel_check(args.layers, 4096, 4, args.steps, tp) for tp in (1, 2, 4, 8)]
    rows.append(context_parallel_check(32768, 8))
    for row in rows:
        print(_format(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def _format(row: dict) -> str:
    if row["check"] == "layer":
        return (f"layer s={row['seq']} recompute={row['recompute']}: saved {row['saved_bytes'] / GIB:.3f} GiB, "
                f"predicted {row['predicted'] / GIB:.3f} GiB ({row['attention_nodes']})")
    if row["check"] == "model":
        return (f"model L={row['layers']} s={row['seq']} b={row['micro_batch']} recompute={row['recompute']}: "
                f"peak {row['peak_bytes'] / GIB:.2f} GiB, predicted {row['predicted_bytes'] / GIB:.2f} GiB; "
                f"fwd+bwd {1000 * row['fwd_bwd_s']:.1f} ms = {100 * row['compute_efficiency']:.1f}% of peak")
    if row["check"] == "tp-rank":
        return (f"one TP{row['tp']} rank, L={row['layers']} s={row['seq']} b={row['micro_batch']}: fwd+bwd "
                f"{1000 * row['fwd_bwd_s']:.1f} ms = {100 * row['compute_efficiency']:.1f}% of peak, "
                f"peak {row['peak_bytes'] / GIB:.2f} GiB")
    return (f"cp attention s={row['seq']} cp={row['cp']}: saved beyond q/k/v {row['saved_bytes_beyond_qkv']}, "
            f"mask predicted {row['predicted_mask_bytes']}, peak delta {row['peak_delta_bytes'] / GIB:.2f} GiB "
            f"({row['attention_nodes']}) {row['error'] or ''}")


if __name__ == "__main__":
    main()
