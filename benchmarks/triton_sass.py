"""Compile the project's GPU-untested Triton kernels for Hopper (sm_90a) on any machine, no GPU
needed, and summarize the machine code: registers, spills, shared memory and the SASS instructions
that decide speed (tensor-core ops, asynchronous copies, the width of each global load and store).

    python benchmarks/triton_sass.py                # every kernel below, as a table
    python benchmarks/triton_sass.py --kernels fp8_gemm --sass   # + the full SASS listing
    PYTHONPATH=/tmp/triton36:. python benchmarks/triton_sass.py  # another Triton: the GPU machine's

Triton ships ptxas and cuobjdump, so a kernel goes from source to SASS on a CPU. Lent GPU time is
short: a kernel that does not compile, or compiles to the wrong instructions (no QGMMA in an FP8
GEMM, byte-wide loads where 16-byte ones were meant), is found here first. The arguments are
specialized as Triton's launcher specializes them at the 7B shapes (pointers 16-byte aligned,
sizes and strides multiples of 16). Needs TRITON_INTERPRET unset: the interpreter replaces the
kernels with Python functions.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The SASS opcodes the table counts, by prefix (widths and types stay in the name: LDG.E.128 is a
# 16-byte load per thread, LDG.E.U8 a byte).
OPCODES = ("LDG", "STG", "LDGSTS", "UTMALDG", "QGMMA", "HGMMA", "HMMA", "RED", "ATOMG")
TARGET_ARCH = 90


@dataclass
class KernelSpec:
    """One kernel at one specialization: its module and name, the types of its runtime arguments,
    its constexprs and launch options."""

    name: str
    module: str
    function: str
    signature: dict[str, str]
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    unaligned: tuple[str, ...] = ()
    """Arguments not specialized as 16-byte aligned / multiples of 16."""


def _fp8_gemm_specs() -> list[KernelSpec]:
    from kernels.triton_fp8_gemm import _CUDA_TILES

    sig = {"A": "*fp8e5", "B": "*fp8e4nv", "C": "*fp32", "SCALE_A": "*fp32", "SCALE_B": "*fp32", "M": "i32",
           "N": "i32", "K": "i32", "stride_a": "i32", "stride_b": "i32", "stride_c": "i32"}
    return [KernelSpec(f"fp8_gemm {bm}x{bn} w{warps} s{stages}", "kernels.triton_fp8_gemm", "_fp8_gemm_kernel", sig,
                       dict(ACCUMULATE=True, BM=bm, BN=bn, BK=128, GROUP_M=8, EVEN_K=True),
                       dict(num_warps=warps, num_stages=stages))
            for bm, bn, warps, stages in _CUDA_TILES]


def _cast_specs() -> list[KernelSpec]:
    from kernels.triton_fp8_cast import TILE

    common = {"SCALE": "*fp32", "AMAX": "*fp32", "M": "i32"}
    tiles = dict(TRANSPOSE=True, WITH_AMAX=True, BM=TILE, BN=TILE)
    return [
        KernelSpec("fp8 cast_transpose", "kernels.triton_fp8_cast", "_cast_transpose_kernel",
                   {"X": "*bf16", "OUT": "*fp8e4nv", "OUT_T": "*u8", **common, "N": "i32", "stride_x": "i32",
                    "limit": "fp32"}, tiles, dict(num_warps=4)),
        KernelSpec("fp8 swiglu_cast", "kernels.triton_fp8_swiglu", "_swiglu_cast_kernel",
                   {"GU": "*bf16", "OUT": "*fp8e4nv", "OUT_T": "*u8", **common, "F": "i32", "stride_gu": "i32",
                    "limit": "fp32"}, tiles, dict(num_warps=4)),
        KernelSpec("fp8 swiglu_grad_cast", "kernels.triton_fp8_swiglu", "_swiglu_grad_cast_kernel",
                   {"GU": "*bf16", "DY": "*bf16", "OUT_G": "*fp8e5", "OUT_U": "*fp8e5", "OUT_T_G": "*u8",
                    "OUT_T_U": "*u8", **{k: v for k, v in common.items() if k != "M"}, "M": "i32", "F": "i32",
                    "stride_gu": "i32", "stride_dy": "i32", "limit": "fp32"}, tiles, dict(num_warps=4)),
        KernelSpec("byte transpose", "kernels.triton_transpose", "_transpose_tile",
                   {"X": "*u8", "Y": "*u8", "M": "i32", "N": "i32", "stride_x": "i32", "stride_y": "i32"},
                   dict(BM=64, BN=64), dict(num_warps=4)),
    ]


def _adamw_specs() -> list[KernelSpec]:
    from kernels.triton_adamw import BLOCK, NUM_WARPS

    sig = {"TABLE": "*i64", "OWNER": "*i32", "FIRST_BLOCK": "*i64", "SCALE": "*fp32", "P_AS": "*fp32",
           "G_AS": "*fp32", "S_AS": "*fp32", "C_AS": "*bf16",
           **{name: "fp32" for name in ("beta1", "beta2", "eps", "decay", "step_size", "bc2_sqrt")}}
    return [KernelSpec(f"adamw multi-tensor, {'aligned' if aligned else 'unaligned'}", "kernels.triton_adamw",
                       "_adamw_multi_tensor", sig, dict(HAS_SCALE=True, HAS_COPY=True, ALIGNED=aligned, BLOCK=BLOCK),
                       dict(num_warps=NUM_WARPS))
            for aligned in (True, False)]


def kernel_specs() -> list[KernelSpec]:
    """The kernels written or changed since the last GPU run (docs/benchmarks.md)."""
    return [*_fp8_gemm_specs(), *_cast_specs(), *_adamw_specs()]


def _jit_function(spec: KernelSpec):
    """The JITFunction under any autotune/heuristics wrappers."""
    import importlib

    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(spec.module), spec.function)
    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise RuntimeError(f"{spec.module}.{spec.function} is not a Triton kernel here ({type(kernel).__name__}): "
                               "unset TRITON_INTERPRET, which turns kernels into Python functions.")
        kernel = kernel.fn
    return kernel


def compile_kernel(spec: KernelSpec):
    """The CompiledKernel of `spec` for sm_90a (asm: ptx, cubin; metadata: shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in spec.signature.items()
               if name not in spec.unaligned and (kind.startswith("*") or kind == "i32")}
    signature = {**spec.signature, **{name: "constexpr" for name in spec.constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, 32), options=spec.options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's output for a cubin (Triton's own copy of the tool)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def registers_and_stack(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers per thread and stack bytes (where spilled registers go) from the resource usage."""
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def opcode_counts(sass: str) -> collections.Counter:
    """Static counts of the OPCODES instructions in a SASS listing, by full opcode (LDG.E.128...)."""
    counts = collections.Counter()
    for line in sass.splitlines():
        match = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if match and match.group(1).split(".")[0] in OPCODES:
            counts[match.group(1)] += 1
    return counts


def summarize(spec: KernelSpec) -> dict:
    """One table row: what the compiled kernel uses, or the compile error."""
    try:
        compiled = compile_kernel(spec)
    except Exception as err:  # noqa: BLE001 - a kernel that does not compile is a row, not the end
        return {"kernel": spec.name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"}
    cubin = compiled.asm["cubin"]
    sass = _cuobjdump(cubin, "--dump-sass")
    regs, stack = registers_and_stack(cubin)
    return {"kernel": spec.name, "registers": regs, "stack_bytes": stack, "shared_bytes": compiled.metadata.shared,
            "opcodes": dict(sorted(opcode_counts(sass).items())), "sass": sass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=None, help="only kernels whose name starts so")
    parser.add_argument("--sass", action="store_true", help="print each kernel's SASS too")
    parser.add_argument("--json", action="store_true", help="one JSON list of the rows (without SASS) instead")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: under the interpreter there is nothing to compile.")
    specs = [s for s in kernel_specs() if not args.kernels or any(s.name.startswith(k) for k in args.kernels)]
    if args.json:
        print(json.dumps([{k: v for k, v in summarize(spec).items() if k != "sass"} for spec in specs]))
        return
    import triton

    print(f"Triton {triton.__version__} ({os.path.dirname(triton.__file__)})\n")
    print(f"| kernel (sm_{TARGET_ARCH}a) | registers | stack B | shared KiB | SASS: count of each opcode |")
    print("| --- | ---: | ---: | ---: | --- |")
    for spec in specs:
        row = summarize(spec)
        if "error" in row:
            print(f"| {spec.name} | failed: {row['error']} | | | |")
            continue
        ops = ", ".join(f"{op} {n}" for op, n in row["opcodes"].items())
        print(f"| {spec.name} | {row['registers']} | {row['stack_bytes']} | {row['shared_bytes'] / 1024:.0f} | {ops} |")
        if args.sass:
            print(row["sass"])


if __name__ == "__main__":
    main()
