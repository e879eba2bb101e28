"""Every GPU-only check in one run, for a machine with one NVIDIA GPU:

  1. the GPU-only tests (tests/test_gpu.py, tests/test_fp8_cuda.py, tests/test_te_fp8.py, ...);
  2. training throughput of our 7B preset cut to as many layers as fit the card, at seq 4096 and
     8192, BF16 and FP8 (torch backend; also Transformer Engine's where it imports), next to
     transformers' LlamaForCausalLM of the same shape (BF16) in the same process: tokens/s,
     TFLOP/s (Megatron's causal count), MFU, peak memory;
  3. the profiling command (`python -m megatron_code.profile`) on the same shape: the product's
     own table with the step-time breakdown, a JSON report and a torch.profiler trace; also SFT
     and DPO steps (synthetic conversations; DPO on as many layers as fit beside its frozen
     reference), each with the planner's predicted peak memory beside the measured one;
  4. the benchmarks of the kernels, the optimizer step and the FP8 weight-gradient GEMMs
     (benchmarks/bench_kernels.py, bench_optimizer.py, bench_fp8_wgrad.py, each --device cuda).

    PYTHONPATH=. python benchmarks/gpu_check.py --out results/   # writes gpu_check.json + logs

Both models take the same training step: --accumulation micro-batches of one sequence, each a
bf16-autocast forward over fp32 master weights with next-token cross-entropy and a backward, then
one fused AdamW step. Record the printed tables in
docs/benchmarks.md with the card, the date and this command.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.trace_breakdown import breakdown, format_breakdown, load_events  # noqa: E402
from kernels.dispatch import package_imports  # noqa: E402
from megatron_code.model.config import ModelConfig  # noqa: E402
from megatron_code.model.fp8 import FP8_LINEARS, enable_fp8  # noqa: E402
from megatron_code.model.gpt import GPTModel  # noqa: E402
from megatron_code.parallel.fused_wgrad import cached_weight_casts  # noqa: E402
from megatron_code.presets import get_preset  # noqa: E402
from megatron_code.plan.layout import Layout  # noqa: E402
from megatron_code.plan.hardware import gpu_for_device  # noqa: E402
from megatron_code.plan.memory import estimate_memory  # noqa: E402
from megatron_code.plan.timing import TimeModelConfig, estimate_time, fp8_efficiency_for_speedup  # noqa: E402
from megatron_code.training.arguments import parse_args  # noqa: E402
from megatron_code.training.config import OptimizerConfig  # noqa: E402
from megatron_code.training.memory_forecast import forecast  # noqa: E402
from megatron_code.training.optimizer import build_optimizer  # noqa: E402
from megatron_code.training.flops import peak_tflops, training_flops_per_token  # noqa: E402

VOCAB = 49152


class Variant(NamedTuple):
    """One of our model's rows; the bf16 rows other than `ours` are the references that the
    fusion, the bf16 residual stream and the Triton AdamW step (with its weight copies) are
    judged against."""
    fp8: bool = False
    fusion: bool = True  # gradient-accumulation fusion
    fp32_residual: bool = False
    optimizer_impl: str = "auto"  # --optimizer-impl
    weight_copies: bool = True  # TritonAdamW writes the next step's bf16 weight copies
    fp8_wgrad_impl: str = "auto"  # --fp8-wgrad-impl: how micro-batches add FP8 weight gradients
    fp8_fused_swiglu: bool = True  # --fp8-fused-swiglu: the SwiGLU writes its FP8 operands itself


VARIANTS = {"ours:bf16": Variant(), "ours-unfused:bf16": Variant(fusion=False),
            "ours-fp32-resid:bf16": Variant(fp32_residual=True),
            "ours-torch-adamw:bf16": Variant(optimizer_impl="torch"),
            "ours-cast-copies:bf16": Variant(weight_copies=False), "ours:fp8": Variant(fp8=True),
            "ours-fp8-wgrad-add:fp8": Variant(fp8=True, fp8_wgrad_impl="reference"),
            "ours-fp8-unfused-swiglu:fp8": Variant(fp8=True, fp8_fused_swiglu=False)}
# A lent GPU comes with minutes, not hours: a hung subprocess must not take the other sections' time.
SECTION_TIMEOUT_S = 240
GPU_TESTS = ("tests/test_gpu.py", "tests/test_fp8_cuda.py", "tests/test_te_fp8.py", "tests/test_kernels_cuda.py",
             "tests/test_context_attention.py", "tests/test_fused_wgrad.py", "tests/test_triton_adamw.py",
             "tests/test_fp8_wgrad.py", "tests/test_distributed_timeout.py")
EXIT_SIGNAL_TESTS = tuple(f"tests/test_launch.py::{name}" for name in (
    "test_exit_signal_saves_and_the_resumed_run_matches_an_uninterrupted_one",
    "test_exit_signal_sent_to_the_launcher_works_when_it_started_with_the_signal_ignored_or_blocked",
    "test_exit_signal_is_delivered_even_if_the_launcher_blocked_it"))


def seven_b_config(num_layers: int, seq: int) -> ModelConfig:
    preset = get_preset("7b")
    fields = {k: v for k, v in preset.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**fields, "num_layers": num_layers, "vocab_size": VOCAB, "max_position_embeddings": seq})


def layers_that_fit(max_layers: int, seq: int) -> int:
    """The most layers (up to max_layers) whose one-GPU training step the planner's memory model
    (megatron_code.plan) puts within 85% of the card: transformers' model, measured in the same
    run, keeps more (unfused fp32 logits) than ours."""
    budget = 0.85 * torch.cuda.get_device_properties(0).total_memory
    one_gpu = Layout(tp=1, pp=1, vp=1, cp=1, dp=1, micro_batch_size=1, distributed_optimizer=False)

    def fits(layers: int) -> bool:
        config = seven_b_config(layers, seq)
        return estimate_memory(config, one_gpu, seq, 1, config.padded_vocab_size()).total <= budget

    return max([n for n in range(1, max_layers + 1) if fits(n)], default=1)


def dpo_layers_that_fit(max_layers: int) -> int:
    """The most layers whose one-GPU DPO profiling step (policy, frozen reference, pairs of 4096
    tokens) the planner puts within 85% of the card."""
    budget = 0.85 * torch.cuda.get_device_properties(0).total_memory / 2**30
    return max([n for n in range(1, max_layers + 1) if planner_peak_gib(n, "dpo", "bf16") <= budget], default=1)


def run_gpu_tests(out_dir: str) -> dict:
    """The GPU-only test files, then the save-and-exit-on-signal tests (CPU training, but the GPU
    machine's process setup is where the signal once went missing) as a separate run, so one
    group's collection error cannot hide the other's results. One log for both."""
    groups = {"gpu": [t for t in GPU_TESTS if os.path.exists(t)], "exit_signal": list(EXIT_SIGNAL_TESTS)}
    results, logs = {}, []
    for name, targets in groups.items():
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
                                  capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
            log, summary, code = proc.stdout + proc.stderr, None, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            log = out.decode(errors="replace") if isinstance(out, bytes) else out
            summary, code = f"timed out after {SECTION_TIMEOUT_S} s", None
        summary = summary or (log.strip().splitlines() or ["(no output)"])[-1]
        logs.append(f"==== {name}: {' '.join(targets)}\n{log}")
        print(f"tests [{name}] ({' '.join(targets)}): {summary}  [{time.time() - start:.0f} s]", flush=True)
        results[name] = {"targets": targets, "returncode": code, "summary": summary}
    with open(os.path.join(out_dir, "tests.log"), "w") as fh:
        fh.write("\n".join(logs))
    return results


def time_steps(step, warmup: int, steps: int, device: str = "cuda") -> float:
    """Median seconds of step() over `steps` calls after `warmup`, run back to back as training runs
    them: on CUDA each step's time is the GPU timeline between CUDA events recorded at the step
    boundaries, with no synchronization between steps (the host queues the next step while the GPU
    runs this one, as the trainer does: training/launched_step.py; idle time the GPU spends waiting
    for the host still counts). Until 2026-11-27 each step was synchronized before and after, which
    also counted the GPU's idle start while the host launched each step's first kernels. On CPU the
    host clock."""
    for _ in range(warmup):
        step()
    if device != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for mark in marks[1:]:
        step()
        mark.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1000 for start, end in zip(marks, marks[1:]))


def ours_step(model, optimizer, tokens, accumulation: int):
    # As the trainer: each token's loss weighted by 1 / the step's tokens, given to the model, whose
    # fused loss head then makes its gradients in the forward.
    weights = torch.full_like(tokens[:, 1:], 1.0 / (accumulation * (tokens.shape[1] - 1)), dtype=torch.float32)

    def step():
        with cached_weight_casts(model):  # as the trainer's step: one bf16 weight copy per step
            for _ in range(accumulation):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=weights)
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hf_step(model, optimizer, tokens, accumulation: int):
    def step():
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def set_fp8(model: GPTModel, config: ModelConfig, fp8: bool, wgrad_impl: str = "auto", fused_swiglu: bool = True) -> None:
    for layer in model.decoder.layers.values():
        for path in FP8_LINEARS:
            layer.get_submodule(path).fp8 = None
        layer.mlp.fp8_fused_swiglu = fused_swiglu
    if fp8:
        enable_fp8(model.decoder.layers, config.replace(fp8_format="hybrid", fp8_wgrad_impl=wgrad_impl))


def measure(name, precision, step, config, seq, args) -> dict:
    """The row of one timed configuration; {"error": "out of memory", ...} where it does not fit
    (transformers' model at the longest sequence, on an 80 GB card), {"error": repr} where it
    fails otherwise (a kernel that does not compile on this card): the other rows still run."""
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = time_steps(step, args.warmup, args.steps)
    except Exception as exc:  # noqa: BLE001 - recorded in the row; one broken row must not lose the others
        error = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else repr(exc)[:500]
        print(f"  {name:<15} {precision:<5} seq {seq:>5}: {error}", flush=True)
        return {"model": name, "precision": precision, "seq": seq, "error": error,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    tokens_per_sec = seq * args.accumulation / seconds
    tflops = training_flops_per_token(config, seq, config.padded_vocab_size()) * tokens_per_sec / 1e12
    peak = peak_tflops(torch.device("cuda"), precision)
    row = {"model": name, "precision": precision, "seq": seq, "step_ms": 1000 * seconds,
           "tokens_per_sec": tokens_per_sec, "tflops": tflops, "mfu": tflops / peak if peak else None,
           "mfu_vs_bf16_peak": tflops / peak_tflops(torch.device("cuda"), "bf16") if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"  {name:<15} {precision:<5} seq {seq:>5}: {row['step_ms']:8.1f} ms  {tokens_per_sec:9,.0f} tok/s  "
          f"{tflops:6.1f} TFLOP/s  MFU {row['mfu'] or 0:6.1%}  mem {row['peak_mem_gib']:5.1f} GiB", flush=True)
    return row


def trainer_optimizer(model, impl: str):
    """The trainer's AdamW (training/optimizer.py: decay on matrices, --optimizer-impl)."""
    return build_optimizer(model, OptimizerConfig(lr=1e-5, weight_decay=0.1, optimizer_impl=impl))


def throughput_ours(num_layers: int, args) -> list[dict]:
    config = seven_b_config(num_layers, max(args.seqs))
    model = GPTModel(config, init_seed=1).cuda()
    optimizer, optimizer_impl = None, None
    rows = []
    for seq in args.seqs:
        tokens = torch.randint(0, VOCAB, (1, seq + 1), device="cuda")
        for label in args.variants:
            variant = VARIANTS[label]
            if variant.optimizer_impl != optimizer_impl:  # free the old Adam state before the new one is made
                optimizer = None
                optimizer, optimizer_impl = trainer_optimizer(model, variant.optimizer_impl), variant.optimizer_impl
            if hasattr(optimizer, "write_weight_copies_for"):
                optimizer.write_weight_copies_for(model if variant.weight_copies else None)
            name = label.split(":")[0]
            set_fp8(model, config, variant.fp8, variant.fp8_wgrad_impl, variant.fp8_fused_swiglu)
            model.set_gradient_accumulation_fusion(variant.fusion)  # all variants on the same weights
            model.embedding.fp32_residual_connection = variant.fp32_residual
            rows.append(measure(name, "fp8" if variant.fp8 else "bf16", ours_step(model, optimizer, tokens, args.accumulation),
                                config, seq, args))
    del model, optimizer
    torch.cuda.empty_cache()
    return rows


def throughput_ours_te(num_layers: int, args) -> list[dict]:
    """The FP8 rows with Transformer Engine's GEMMs (--fp8-backend te), where TE imports: with TE's
    gradient-accumulation fusion (`ours-te`) and without (`ours-te-unfused`), on the same weights."""
    if not package_imports("transformer_engine.pytorch"):
        print("  ours-te: skipped (Transformer Engine does not import here)", flush=True)
        return []
    config = seven_b_config(num_layers, max(args.seqs)).replace(fp8_format="hybrid", fp8_backend="te")
    model = GPTModel(config, init_seed=1).cuda()
    optimizer = trainer_optimizer(model, "auto")
    rows = []
    for seq in args.seqs:
        tokens = torch.randint(0, VOCAB, (1, seq + 1), device="cuda")
        for name, fusion in (("ours-te", True), ("ours-te-unfused", False)):
            model.set_gradient_accumulation_fusion(fusion)
            rows.append(measure(name, "fp8", ours_step(model, optimizer, tokens, args.accumulation), config, seq, args))
    del model, optimizer
    torch.cuda.empty_cache()
    return rows


def throughput_hf(num_layers: int, args) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from checkpoints_convert.adapters import LlamaAdapter

    ours = seven_b_config(num_layers, max(args.seqs))
    # The config our converter writes for this shape (what transformers would load), untrained.
    hf_config = LlamaConfig.from_dict({**LlamaAdapter().hf_config(ours, torch.float32, {}), "use_cache": False},
                                      attn_implementation="sdpa")

    def build():
        with torch.device("cuda"):
            return LlamaForCausalLM(hf_config)
    return timed_rows("transformers", "bf16", build, hf_step, ours, args)


def timed_rows(name: str, precision: str, build, make_step, config: ModelConfig, args) -> list[dict]:
    """One row per sequence length for the model build() makes, trained by make_step(model,
    optimizer, tokens, accumulation); the model is freed before returning."""
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rows = []
    for seq in args.seqs:
        tokens = torch.randint(0, VOCAB, (1, seq + 1), device="cuda")
        rows.append(measure(name, precision, make_step(model, optimizer, tokens, args.accumulation), config, seq, args))
    del model, optimizer
    torch.cuda.empty_cache()
    return rows


def profile_training_flags(num_layers: int, precision: str, mode: str) -> list[str]:
    """The training flags of a profiling run of the cut 7B shape: micro-batches of one sample (a DPO
    pair: two sequences), four per step, seq 4096; SFT/DPO on synthetic conversations."""
    flags = ["--preset", "7b", "--num-layers", str(num_layers), "--seq-length", "4096", "--vocab-size", str(VOCAB),
             "--bf16", "--micro-batch-size", "1", "--global-batch-size", "4", "--num-workers", "0",
             "--training-mode", mode]
    if mode == "sft":  # as launch/slurm/sft_7b.sbatch: packed conversations attend within themselves
        flags += ["--reset-attention-mask", "--reset-position-ids"]
    if precision == "fp8":
        flags += ["--fp8-format", "hybrid"]
    return flags


def planner_peak_gib(num_layers: int, mode: str, precision: str) -> float:
    """The planner's forecast for that run on one GPU (what its profiling report prints beside the
    measured peak; memory does not depend on the GPU model)."""
    return forecast(parse_args(profile_training_flags(num_layers, precision, mode) + ["--mock-data"]), 1).total / 2**30


# The job scripts' ZeRO-1 with bf16 parameters (sharded fp32 master weights), on one rank.
BF16_PARAMS = ("--use-distributed-optimizer", "--params-dtype", "bfloat16")


def run_profile_command(num_layers: int, out_dir: str, precision: str, mode: str = "pretrain",
                        extra: tuple[str, ...] = (), label: str = "") -> dict | None:
    """`python -m megatron_code.profile` (the trainer's own step) on the cut 7B shape; its log and
    a gzipped one-step trace go to out_dir, its JSON report (with the planner's peak beside the
    measured one) into gpu_check.json. SFT and DPO run on the profiler's synthetic conversations
    (DPO's reference: the initial weights). `extra` flags, named by `label` in the files."""
    name = (precision if mode == "pretrain" else f"{mode}_{precision}") + label
    trace_dir = os.path.join(out_dir, f"trace_{name}")
    report = os.path.join(trace_dir, "report.json")
    cmd = [sys.executable, "-m", "megatron_code.profile", *profile_training_flags(num_layers, precision, mode), *extra,
           "--profile-steps", "5", "--profile-warmup", "3", "--trace-dir", trace_dir, "--trace-steps", "1",
           "--report", report]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
    with open(os.path.join(out_dir, f"profile_{name}.log"), "w") as fh:
        fh.write(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")) or proc.stderr[-3000:])
    trace = os.path.join(trace_dir, "trace_rank0.json")
    result = json.load(open(report)) if os.path.exists(report) else None
    if os.path.exists(trace):  # gzip: Perfetto opens .json.gz directly
        with open(trace, "rb") as src, gzip.open(os.path.join(out_dir, f"trace_{name}.json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        # The breakdown goes into the log and the JSON too: the device tool may not return the trace.
        text = format_breakdown(breakdown(load_events(trace), 25))
        with open(os.path.join(out_dir, f"profile_{name}.log"), "a") as fh:
            fh.write("\n" + text + "\n")
        print("\n".join(text.splitlines()[:13]), flush=True)
        if result is not None:
            result["trace_breakdown"] = text
    shutil.rmtree(trace_dir, ignore_errors=True)
    return result


def run_bench(script: str, out_dir: str) -> str | None:
    """benchmarks/<script>.py --device cuda; its output into <script>_cuda.log and the result."""
    path = f"benchmarks/{script}.py"
    if not os.path.exists(path):
        return None
    proc = subprocess.run([sys.executable, path, "--device", "cuda"],
                          capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    with open(os.path.join(out_dir, f"{script}_cuda.log"), "w") as fh:
        fh.write(text)
    print(proc.stdout[-6000:] or proc.stderr[-3000:])
    return text


def run_preflight(out_dir: str) -> dict:
    """mcode-preflight on this one GPU: its bf16 GEMM TFLOP/s, the number the 512-GPU check
    compares across GPUs (launch/slurm/preflight.sbatch)."""
    report = os.path.join(out_dir, "preflight.json")
    proc = subprocess.run([sys.executable, "-m", "megatron_code.preflight", "--report", report],
                          capture_output=True, text=True, timeout=SECTION_TIMEOUT_S)
    print(proc.stdout[-3000:] or proc.stderr[-3000:])
    if not os.path.exists(report):
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1000:]}"}
    with open(report) as fh:
        ranks = json.load(fh)["ranks"]
    return {"exit": proc.returncode, "gemm_tflops": ranks[0]["gemm_tflops"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check_results")
    parser.add_argument("--max-layers", type=int, default=16)
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=4,
                        help="Micro-batches (of one sequence) per optimizer step, as in real pretraining.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="Which of our model's rows to time (default all).")
    parser.add_argument("--skip", nargs="*", action="extend", default=None,
                        choices=["tests", "ours", "ours_te", "transformers", "profile", "profile_fp8", "sft", "dpo", "kernels",
                                 "optimizer", "fp8_wgrad", "profile_bf16_params", "preflight"])
    parser.add_argument("--merge", nargs="+", metavar="GPU_CHECK_JSON",
                        help="Print one table of the rows of earlier runs' gpu_check.json files (same card), run nothing.")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.merge:
        return merge_results(args.merge)
    args.skip = args.skip or []
    os.makedirs(args.out, exist_ok=True)
    layers = layers_that_fit(args.max_layers, max(args.seqs))
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "layers": layers, "command": " ".join(sys.argv)}
    print(f"{result['device']} | torch {torch.__version__} | 7B shape cut to {layers} layers", flush=True)
    # Throughput first: the numbers nothing else can give; the tests and the rest have time limits.
    sections = {"ours": lambda: throughput_ours(layers, args),
                "ours_te": lambda: throughput_ours_te(layers, args),
                "transformers": lambda: throughput_hf(layers, args),
                "tests": lambda: run_gpu_tests(args.out),
                "profile": lambda: run_profile_command(layers, args.out, "bf16"),
                "profile_fp8": lambda: run_profile_command(layers, args.out, "fp8"),
                "sft": lambda: run_profile_command(layers, args.out, "bf16", "sft"),
                # The frozen reference and pairs of sequences: as many layers as the planner fits.
                "dpo": lambda: run_profile_command(dpo_layers_that_fit(args.max_layers), args.out, "bf16", "dpo"),
                "kernels": lambda: run_bench("bench_kernels", args.out) is not None,
                "optimizer": lambda: run_bench("bench_optimizer", args.out),
                "fp8_wgrad": lambda: run_bench("bench_fp8_wgrad", args.out),
                "preflight": lambda: run_preflight(args.out),
                # Last (each section's result is saved as it ends): the job scripts' bf16 parameters
                # under ZeRO-1 (one rank), beside `profile`; on one GPU both hold 18 bytes per parameter.
                "profile_bf16_params": lambda: run_profile_command(layers, args.out, "bf16", extra=BF16_PARAMS,
                                                                   label="_bf16_params")}
    for name, section in sections.items():
        if name in args.skip:
            continue
        try:
            result[name] = section()
        except Exception as exc:  # one broken section must not lose the others' numbers
            result[name] = {"error": repr(exc)}
            print(f"section {name} failed: {exc!r}", flush=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:  # after each section
            json.dump(result, fh, indent=2)
    print_comparison(result)
    return result


def merge_results(paths: list[str]) -> dict:
    """The runs' results as one (rows of each section concatenated), printed as one table: the
    phases of benchmarks/gpu_session.sh, which times TE's rows in a second process."""
    runs = [json.load(open(path)) for path in paths if os.path.exists(path)]
    if not runs:
        sys.exit(f"none of {paths} exists")
    merged = dict(runs[0])
    for run in runs[1:]:
        if run["device"] != merged["device"] or run["layers"] != merged["layers"]:
            sys.exit(f"{paths}: runs on different cards or layer counts cannot share a table")
        for key, value in run.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = merged[key] + value
            else:
                merged.setdefault(key, value)
    print_comparison(merged)
    return merged


def print_comparison(result: dict) -> None:
    """Markdown table: each of our rows next to transformers' BF16 row of the same sequence length."""
    ours, theirs = result.get("ours"), result.get("transformers")
    if not isinstance(ours, list):
        return
    theirs = theirs if isinstance(theirs, list) else []
    if isinstance(result.get("ours_te"), list):
        ours = ours + result["ours_te"]
    failed = [row for row in ours + theirs if "error" in row]
    ours, theirs = [row for row in ours if "error" not in row], [row for row in theirs if "error" not in row]
    hf = {row["seq"]: row for row in theirs}
    print(f"\n{result['device']}, 7B shape x {result['layers']} layers, {result['date']}")
    print("| seq | model | precision | tokens/s | TFLOP/s | MFU | peak GiB | vs transformers | fp8 / bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    bf16 = {row["seq"]: row for row in ours if row["precision"] == "bf16" and row["model"] == "ours"}
    for row in sorted(ours + theirs, key=lambda r: (r["seq"], r["model"] != "ours", r["precision"])):
        base = hf.get(row["seq"])
        speedup = f"{row['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "n/a"
        fp8_gain = (f"{row['tokens_per_sec'] / bf16[row['seq']]['tokens_per_sec']:.2f}x"
                    if row["precision"] == "fp8" and row["seq"] in bf16 else "")
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"| {row['seq']} | {row['model']} | {row['precision']} | {row['tokens_per_sec']:,.0f} | "
              f"{row['tflops']:.0f} | {mfu} | {row['peak_mem_gib']:.1f} | {speedup} | {fp8_gain} |")
    for row in failed:
        print(f"| {row['seq']} | {row['model']} | {row['precision']} | {row['error']} | | | | | |")
    for line in fp8_refit_lines(result["device"], result["layers"], ours):
        print(line)


def fp8_refit_lines(device: str, layers: int, rows: list[dict]) -> list[str]:
    """Per sequence length with our BF16 and FP8 rows: the planner's FP8 / BF16 step ratio at its
    default fp8_compute_efficiency beside the measured one, and the efficiency that would give it
    (how to refit the default: docs/planner.md, "Compute")."""
    gpu = gpu_for_device(device)
    pairs = {}
    for row in rows:
        if row["model"] == "ours":
            pairs.setdefault(row["seq"], {})[row["precision"]] = row
    lines = []
    for seq, pair in sorted(pairs.items()):
        if gpu is None or not {"bf16", "fp8"} <= set(pair):
            continue
        config = seven_b_config(layers, seq)
        # step_ms x tokens/s = tokens per step = micro-batches x seq
        micro_batches = round(pair["bf16"]["tokens_per_sec"] * pair["bf16"]["step_ms"] / 1000 / seq)
        one_gpu = Layout(tp=1, pp=1, vp=1, cp=1, dp=1, micro_batch_size=1, distributed_optimizer=False)
        args = (config, one_gpu, seq, micro_batches, config.padded_vocab_size(), gpu)
        predicted = (estimate_time(*args, TimeModelConfig()).step
                     / estimate_time(*args, TimeModelConfig(precision="fp8")).step)
        measured = pair["bf16"]["step_ms"] / pair["fp8"]["step_ms"]
        implied = fp8_efficiency_for_speedup(*args, measured)
        lines.append(f"planner, seq {seq}: FP8/BF16 {predicted:.2f}x at fp8_compute_efficiency "
                     f"{TimeModelConfig.fp8_compute_efficiency}; measured {measured:.2f}x, which implies "
                     f"{'n/a' if implied is None else f'{implied:.3f}'}")
    return lines


if __name__ == "__main__":
    main()
