"""`python -m megatron_code.plan`: rank the parallel layouts of a preset on a GPU cluster.

    python -m megatron_code.plan --preset 7b --gpus 512 --gpu h100-sxm --seq-length 4096 --top 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import tempfile

from megatron_code.errors import ConfigError
from megatron_code.model.core_attention import packed_attention_kernel
from megatron_code.plan.hardware import GPUS, get_gpu
from megatron_code.plan.measured_links import read_preflight, with_measured_links
from megatron_code.plan.memory import Execution
from megatron_code.plan.search import GIB, Candidate, PlanRequest, PlanResult, nearest_valid_batch, plan
from megatron_code.plan.timing import TimeModelConfig
from megatron_code.presets import PRESETS, get_preset
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.flops import training_flops_per_token

DEFAULT_VOCAB = 49152  # the 7B design's tokenizer size (docs/model.md); presets carry no vocabulary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcode-plan", description="Rank parallel layouts (TP, PP, VP, CP, DP, "
                                "micro-batch, recompute, ZeRO-1) by predicted step time; only layouts that "
                                "the trainer accepts and that fit in GPU memory are listed.")
    p.add_argument("--preset", required=True, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    p.add_argument("--gpu", default="h100-sxm", help=f"accelerator: {', '.join(GPUS)} (default h100-sxm)")
    p.add_argument("--seq-length", type=int, help="tokens per sample (default: the preset's)")
    p.add_argument("--global-batch-size", type=int, help="samples per step (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help=f"tokenizer size (default {DEFAULT_VOCAB})")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="micro-batch sizes to try")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="GEMM precision (default bf16)")
    p.add_argument("--training-mode", choices=("pretrain", "sft", "dpo"), default="pretrain",
                   help="pretrain and sft plan alike; dpo: batch sizes count preference pairs (two sequences "
                        "each), TP x DP only, plus the frozen reference's weights and forward passes")
    p.add_argument("--packed-documents", action=argparse.BooleanOptionalAction, default=None,
                   help="rows pack documents that attend within themselves (--reset-attention-mask, as "
                        "launch/slurm/sft_7b.sbatch runs), on the sdpa backend: counts the memory and time of the "
                        "kernel this torch runs them with (default: on for --training-mode sft)")
    p.add_argument("--compute-efficiency", type=float, default=TimeModelConfig.compute_efficiency,
                   help="fraction of dense peak the layers reach (default %(default)s, measured on H200)")
    p.add_argument("--fp8-compute-efficiency", type=float, default=TimeModelConfig.fp8_compute_efficiency,
                   help="with --precision fp8: fraction of the FP8 dense peak the FP8 GEMMs reach, casts "
                        "included (default %(default)s, from measured FP8/BF16 steps on H100 and H200)")
    p.add_argument("--masked-attention-efficiency", type=float, default=TimeModelConfig.masked_attention_efficiency,
                   help="fraction of the BF16 peak the masked attention kernel reaches on packed documents where no "
                        "varlen kernel runs them (default %(default)s, measured on H200)")
    p.add_argument("--link-efficiency", type=float, default=TimeModelConfig.link_efficiency,
                   help="fraction of link bandwidth collectives reach (default %(default)s)")
    p.add_argument("--ddp-bucket-size", type=int,
                   help="gradient elements per data-parallel bucket, as the trainer's flag (default: its "
                        "default, max(40M, 1M x DP x CP)); the recommended command passes it on")
    p.add_argument("--ib-gbps", type=float, help="inter-node bandwidth per GPU in Gb/s (default: the GPU table's)")
    p.add_argument("--network-from", metavar="PREFLIGHT_JSON",
                   help="link bandwidths measured on the cluster by mcode-preflight --report (its medians), "
                        "in place of the datasheet's (docs/launch.md)")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", help="also write every fitting layout with its predictions to this file")
    return p


def request_from_args(args: argparse.Namespace) -> tuple[PlanRequest, TimeModelConfig]:
    """Checks every input before the search starts; one ConfigError names the first bad one."""
    values = get_preset(args.preset)
    values["vocab_size"] = args.vocab_size
    run = run_config_from_values(values)
    # `is None`, not `or`: an explicit 0 is bad input to report, not a request for the default.
    seq = run.data.seq_length if args.seq_length is None else args.seq_length
    batch = run.training.global_batch_size if args.global_batch_size is None else args.global_batch_size
    for name, value in (("--gpus", args.gpus), ("--seq-length", seq), ("--global-batch-size", batch),
                        ("--vocab-size", args.vocab_size), ("--top", args.top),
                        ("--ddp-bucket-size", 1 if args.ddp_bucket_size is None else args.ddp_bucket_size),
                        *(("--micro-batch-sizes", m) for m in args.micro_batch_sizes)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}.")
    if seq > run.model.max_position_embeddings:
        raise ConfigError(f"--seq-length ({seq}) exceeds the {args.preset} preset's max_position_embeddings "
                          f"({run.model.max_position_embeddings}).")
    for name, value in (("--compute-efficiency", args.compute_efficiency), ("--link-efficiency", args.link_efficiency),
                        ("--fp8-compute-efficiency", args.fp8_compute_efficiency),
                        ("--masked-attention-efficiency", args.masked_attention_efficiency)):
        if not 0 < value <= 1:
            raise ConfigError(f"{name} must be in (0, 1], got {value}.")
    run.model.validate()
    gpu = get_gpu(args.gpu, args.ib_gbps)
    if args.network_from:
        links = read_preflight(args.network_from)
        if args.ib_gbps is not None and links.inter_node_bus is not None:
            raise ConfigError(f"--ib-gbps and --network-from {args.network_from} both give the inter-node "
                              "bandwidth; keep one.")
        gpu = with_measured_links(gpu, links, args.link_efficiency)
    tm = TimeModelConfig(compute_efficiency=args.compute_efficiency, link_efficiency=args.link_efficiency,
                         fp8_compute_efficiency=args.fp8_compute_efficiency,
                         masked_attention_efficiency=args.masked_attention_efficiency, precision=args.precision,
                         ddp_bucket_size=args.ddp_bucket_size)
    gpu.peak_tflops(args.precision)  # FP8 on a GPU without it is refused here, before the search
    packed = args.training_mode == "sft" if args.packed_documents is None else args.packed_documents
    request = PlanRequest(model=run.model, gpus=args.gpus, gpu=gpu, seq_length=seq, global_batch_size=batch,
                          micro_batch_sizes=tuple(args.micro_batch_sizes), training_mode=args.training_mode,
                          execution=Execution(document_attention=packed_attention_kernel("cuda") if packed else None,
                                              fp8=args.precision == "fp8"))
    return request, tm


def header(request: PlanRequest, tm: TimeModelConfig, result: PlanResult, preset: str) -> str:
    m, g = request.model, request.gpu
    params = m.num_parameters() / 1e9
    flops = training_flops_per_token(m, request.seq_length, m.padded_vocab_size()) / 1e9
    sequences = request.global_batch_size * request.sequences_per_sample
    tokens = sequences * request.seq_length
    batch = (f"{request.global_batch_size} pairs = {sequences} sequences" if request.training_mode == "dpo"
             else f"{request.global_batch_size}")
    dpo = ("\nDPO: TP x DP only; `wts` includes the frozen reference's weights, `step s` its forward passes, "
           "MFU its FLOPs" if request.training_mode == "dpo" else "")
    kernel = request.execution.document_attention
    packed = ("" if kernel is None else f"\npacked documents: the {kernel} kernel without CP, the masked one under CP "
              f"(every score block, at {100 * tm.masked_attention_efficiency:.0f}% of peak)")
    fp8 = f" (FP8 GEMMs at {100 * tm.fp8_compute_efficiency:.0f}% of the FP8 peak)" if tm.precision == "fp8" else ""
    return (f"model {preset}: {params:.2f}B parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_attention_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}); {flops:.1f} GFLOP/token\n"
            f"batch: {batch} x {request.seq_length} tokens = {tokens / 1e6:.2f}M tokens/step\n"
            f"cluster: {request.gpus} x {g.name} ({g.peak_tflops(tm.precision):.0f} dense {tm.precision} TFLOP/s, "
            f"{g.memory_gb:.0f} GB, {g.gpus_per_node}/node, {g.intra_node_gb_per_s:.0f} GB/s intra-node, "
            f"{g.inter_node_gb_per_s:.0f} GB/s/GPU inter-node)\n"
            + (f"{g.links_note}\n" if g.links_note else "") +
            f"assumed: compute at {100 * tm.compute_efficiency:.0f}% of peak{fp8}, links at {100 * tm.link_efficiency:.0f}%, "
            f"{request.memory_budget / GIB:.1f} GiB usable per GPU{packed}\n"
            f"searched {result.parallel_layouts} layouts: {result.valid} valid, {len(result.candidates)} fit{dpo}")


COLUMNS = ("  #  TP PP VP CP   DP mb recompute        zero1 |  wts  grad  optim  activ  total GiB |"
           " bubble   TP ms  CP ms  PP ms  DP ms |  step s  tok/s/GPU   MFU")


def row(rank: int, c: Candidate) -> str:
    lay, mem, t = c.layout, c.memory, c.time
    gib = [x / GIB for x in (mem.weights + mem.reference, mem.grads, mem.optimizer, mem.activations, mem.total)]
    ms = [1000 * x for x in (t.tp_comm, t.cp_comm, t.pp_comm, t.dp_comm)]
    return (f"{rank:3d} {lay.tp:3d} {lay.pp:2d} {lay.vp:2d} {lay.cp:2d} {lay.dp:4d} {lay.micro_batch_size:2d} "
            f"{lay.recompute_label:16s} {'yes' if lay.distributed_optimizer else 'no':>5s} | "
            f"{gib[0]:4.1f} {gib[1]:5.1f} {gib[2]:6.1f} {gib[3]:6.1f} {gib[4]:6.1f}     | "
            f"{100 * t.bubble_fraction:5.1f}% {ms[0]:7.0f} {ms[1]:6.0f} {ms[2]:6.0f} {ms[3]:6.0f} | "
            f"{t.step:7.2f} {c.tokens_per_s_per_gpu:10,.0f} {100 * c.mfu:5.1f}%")


def candidate_record(c: Candidate, request: PlanRequest) -> dict:
    return {"layout": dataclasses.asdict(c.layout), "recompute": c.layout.recompute_label,
            "memory_bytes": {**dataclasses.asdict(c.memory), "total": c.memory.total},
            "time_s": {**dataclasses.asdict(c.time), "step": c.time.step},
            "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu, "mfu": c.mfu,
            "train_flags": train_flags(c, request)}


def train_flags(c: Candidate, request: PlanRequest) -> list[str]:
    mode = ["--training-mode", request.training_mode] if request.training_mode != "pretrain" else []
    return mode + c.layout.train_flags(request.global_batch_size)


def write_json(path: str, request: PlanRequest, tm: TimeModelConfig, result: PlanResult) -> None:
    """Atomically (temp file + rename): an interrupted run never leaves a truncated file."""
    record = {"request": {"model": dataclasses.asdict(request.model), "gpus": request.gpus,
                          "gpu": dataclasses.asdict(request.gpu), "seq_length": request.seq_length,
                          "global_batch_size": request.global_batch_size, "training_mode": request.training_mode,
                          "memory_budget_bytes": request.memory_budget},
              "assumptions": dataclasses.asdict(tm),
              "candidates": [candidate_record(c, request) for c in result.candidates]}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as fh:
        json.dump(record, fh, indent=1)
    os.replace(fh.name, path)


def refusal_report(request: PlanRequest, result: PlanResult, shown: int = 4) -> list[str]:
    """Why no searched layout is valid: the trainer's distinct reasons, one example layout each."""
    examples: dict[str, tuple[str, str]] = {}  # reason with its numbers masked -> (layout, reason)
    for label, reason in result.refusals.items():
        examples.setdefault(re.sub(r"\d+", "N", reason), (label, reason))
    lines = [f"No valid layout: the trainer would refuse all {result.parallel_layouts} searched layouts "
             f"({len(examples)} kind{'s' if len(examples) > 1 else ''} of reason). For example:"]
    lines += [f"  {label}: {reason}" for label, reason in list(examples.values())[:shown]]
    lines.append(f"The search tries TP and CP in powers of two (TP within a node of {request.gpu.gpus_per_node}), "
                 f"PP dividing the {request.model.num_layers} layers, and DP = --gpus / (TP x CP x PP); "
                 f"micro-batch x DP must divide --global-batch-size.")
    nearest = nearest_valid_batch(request)
    if nearest is not None:
        batch, layout = nearest
        lines.append(f"Nearest global batch size the trainer accepts on {request.gpus} GPUs: "
                     f"--global-batch-size {batch} (e.g. {layout.label}).")
    else:
        lines.append(f"No global batch size makes a layout on {request.gpus} GPUs valid: choose another --gpus.")
    return lines


def report(request: PlanRequest, tm: TimeModelConfig, result: PlanResult, preset: str, top: int) -> str:
    lines = [header(request, tm, result, preset), ""]
    if not result.valid:
        lines += refusal_report(request, result)
        return "\n".join(lines)
    if not result.candidates:
        lines.append("No layout fits: raise --gpus, lower --seq-length or --global-batch-size, or use a larger GPU.")
        return "\n".join(lines)
    lines += [COLUMNS] + [row(i + 1, c) for i, c in enumerate(result.candidates[:top])]
    best = result.candidates[0]
    bucket = ["--ddp-bucket-size", str(tm.ddp_bucket_size)] if tm.ddp_bucket_size else []
    flags = shlex.join(train_flags(best, request) + bucket)
    lines += ["", f"recommended (rank 1): torchrun ... -m megatron_code.train --preset {preset} "
                  f"--seq-length {request.seq_length} {flags}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        request, tm = request_from_args(args)
    except ConfigError as exc:
        print(f"mcode-plan: error: {exc}", file=sys.stderr)
        return 2
    result = plan(request, tm)
    print(report(request, tm, result, args.preset, args.top))
    if args.json:
        write_json(args.json, request, tm, result)
    return 0 if result.candidates else 1
