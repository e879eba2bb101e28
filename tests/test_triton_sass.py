"""benchmarks/triton_sass.py: the Triton kernels not yet run on a GPU, compiled for Hopper
(sm_90a) on this machine (Triton ships ptxas and cuobjdump), compile to the instructions they were
written for: FP8 tensor-core MMAs fed by 16-byte asynchronous copies, 16-byte loads and stores in
the memory-bound kernels, no register spills. A GPU finds the same only after a lent machine's
minutes are spent."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas_ships() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    bin_dir = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, tool)) for tool in ("ptxas", "cuobjdump"))


pytestmark = pytest.mark.skipif(not _ptxas_ships(), reason="needs triton with its NVIDIA backend's ptxas and cuobjdump")


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not Python ones
    done = subprocess.run([sys.executable, "benchmarks/triton_sass.py", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {row["kernel"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}


def _has(row: dict, prefix: str) -> bool:
    return any(op.startswith(prefix) for op in row["opcodes"])


def test_every_kernel_compiles_for_hopper_without_spilling(rows):
    assert len(rows) >= 10
    failed = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not failed
    spilled = {name: row["stack_bytes"] for name, row in rows.items() if row["stack_bytes"]}
    assert not spilled, "register spills (stack bytes); benchmarks/triton_sass.py shows the kernel"


def test_fp8_gemm_runs_on_fp8_tensor_cores_fed_by_asynchronous_copies(rows):
    tiles = [row for name, row in rows.items() if name.startswith("fp8_gemm")]
    assert len(tiles) == 4
    for row in tiles:
        assert _has(row, "QGMMA") and not _has(row, "HMMA"), row["opcodes"]
        assert _has(row, "LDGSTS.E.BYPASS.128"), row["opcodes"]


def test_adamw_vectorizes_when_told_its_addresses_are_aligned(rows):
    aligned, unaligned = rows["adamw multi-tensor, aligned"], rows["adamw multi-tensor, unaligned"]
    assert _has(aligned, "LDG.E.128") and _has(aligned, "STG.E.128"), aligned["opcodes"]
    assert not _has(unaligned, "LDG.E.128"), "the ALIGNED flag would change nothing"


@pytest.mark.parametrize("name", ["fp8 cast_transpose", "fp8 swiglu_cast", "fp8 swiglu_grad_cast", "byte transpose"])
def test_fp8_casts_and_transposes_move_16_bytes_per_thread(rows, name):
    row = rows[name]
    assert _has(row, "LDG.E.128") and _has(row, "STG.E.128"), row["opcodes"]
    assert not any(op.startswith("STG.E.U8") or op == "STG.E" for op in row["opcodes"]), row["opcodes"]
