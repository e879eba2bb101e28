"""What the planner would recommend if ZeRO-1 worked as Megatron-LM's distributed optimizer does:
bf16 parameters, fp32 gradients, and fp32 master weights sharded with the Adam moments.

Our trainer keeps the fp32 parameters as the master weights (bf16 is autocast, with per-step bf16
copies of the GEMM weights), so a rank holds, per parameter of its TP/PP slice,

    ours:     4 (fp32 weights) + 2 (bf16 GEMM copies, during a step) + 4 (fp32 grads)
              + 4/G (reduced shard) + 8/G (Adam)            and all-gathers 4 bytes after the step
    Megatron: 2 (bf16 weights) + 4 (fp32 grads) + 12/G (master + Adam)   and all-gathers 2 bytes

(G = DP x CP). This script reruns the planner's search with those bytes and prints both rankings'
top rows: the gain that implementing the design would buy, by the same model. It is an analysis of
a design we do not have; the planner itself models only what the trainer does.

    python benchmarks/plan_bf16_params_what_if.py --preset 7b --gpus 512 --seq-length 4096
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_code.plan import memory, timing  # noqa: E402
from megatron_code.plan.cli import build_parser, report, request_from_args  # noqa: E402
from megatron_code.plan.search import plan  # noqa: E402

FP32, BF16 = memory.FP32, memory.BF16


def megatron_rank_memory(original):
    """rank_memory with Megatron's bytes under ZeRO-1 (unchanged without it: 18 bytes either way)."""
    def rank_memory(config, layout, seq_length, global_batch_size, pp_rank, padded_vocab, execution):
        estimate = original(config, layout, seq_length, global_batch_size, pp_rank, padded_vocab, execution)
        if not layout.distributed_optimizer:
            return estimate
        params = estimate.weights // FP32
        shards = layout.dp * layout.cp
        return dataclasses.replace(estimate, weights=BF16 * params, grads=FP32 * params,
                                   optimizer=3 * FP32 * params // shards)
    return rank_memory


def megatron_data_parallel(original):
    """ZeRO-1's all-gather moves bf16 parameters: the reduce-scatter as before, the gather halved
    (each exposed as timing._data_parallel exposes it: what the first forward does not cover)."""
    def gather(config, layout, padded_vocab, gpu, tm, compute, bytes_per_param):
        group = layout.dp * layout.cp
        bandwidth = timing._link(gpu, layout.tp * group) * tm.link_efficiency
        params = timing._largest_rank_parameters(config, layout, padded_vocab)
        edge = timing._ring(group) * bytes_per_param * padded_vocab // layout.tp * config.hidden_size / bandwidth
        edge = min(edge, timing._ring(group) * bytes_per_param * params / bandwidth)
        edge = max(edge, timing._ring(group) * min(timing.BUCKET_BYTES, bytes_per_param * params) / bandwidth)
        return max(timing._ring(group) * bytes_per_param * params / bandwidth - compute / 3, edge)

    def data_parallel(config, layout, padded_vocab, gpu, tm, compute):
        ours = original(config, layout, padded_vocab, gpu, tm, compute)
        if not layout.distributed_optimizer or layout.dp * layout.cp == 1:
            return ours
        args = (config, layout, padded_vocab, gpu, tm, compute)
        return ours - gather(*args, FP32) + gather(*args, BF16)
    return data_parallel


@contextlib.contextmanager
def megatron_style():
    with mock.patch.object(memory, "rank_memory", megatron_rank_memory(memory.rank_memory)), \
            mock.patch.object(memory, "weight_copy_bytes", lambda execution, fp8_layer: BF16 if fp8_layer else 0), \
            mock.patch.object(timing, "_data_parallel", megatron_data_parallel(timing._data_parallel)):
        yield


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()  # the planner's own flags
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    request, tm = request_from_args(args)
    ours = plan(request, tm)
    with megatron_style():
        megatron = plan(request, tm)
    for title, result in (("ours (fp32 parameters are the master weights)", ours),
                          ("what if: Megatron's distributed optimizer (bf16 parameters, sharded fp32 master)", megatron)):
        print(f"== {title}\n{report(request, tm, result, args.preset, args.top)}\n")
    best, what_if = ours.candidates[0], megatron.candidates[0]
    print(f"best step: {best.time.step:.2f} s -> {what_if.time.step:.2f} s "
          f"({what_if.tokens_per_s_per_gpu / best.tokens_per_s_per_gpu:.2f}x tokens/s/GPU)")


if __name__ == "__main__":
    main()
