"""The accelerators the planner knows: dense peak TFLOP/s, memory, and link bandwidths.

Sources (vendor datasheets; "dense" = the datasheet's sparsity figure halved):
- H100 SXM5 and H100 PCIe: "NVIDIA H100 Tensor Core GPU" datasheet,
  https://www.nvidia.com/en-us/data-center/h100/ : BF16 1,979 / 1,513 TFLOPS and FP8 3,958 / 3,026
  TFLOPS with sparsity; 80 GB at 3.35 / 2.0 TB/s; NVLink 900 GB/s (SXM, both directions);
  the PCIe card talks over PCIe Gen5 x16 (128 GB/s both directions; its NVLink bridge joins
  only pairs, so TP > 2 goes over PCIe).
- H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet, https://www.nvidia.com/en-us/data-center/h200/ :
  BF16 1,979 / FP8 3,958 TFLOPS with sparsity, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
- A100 SXM 80 GB: "NVIDIA A100 Tensor Core GPU" datasheet, https://www.nvidia.com/en-us/data-center/a100/ :
  BF16 312 TFLOPS dense (624 sparse), no FP8, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s.
- Inter-node: DGX H100 has one 400 Gb/s ConnectX-7 InfiniBand NIC per GPU (50 GB/s each way;
  DGX H100 user guide); DGX A100 one 200 Gb/s HDR NIC per GPU. Clusters built from other
  servers are assumed to match (override with --ib-gbps).
The H100 SXM and A100 peaks are those of megatron_code.training.flops.PEAK_TFLOPS (used for MFU).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_code.errors import ConfigError


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model and the node it sits in."""

    name: str
    """Short name used on the command line (--gpu)."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak, TFLOP/s."""
    fp8_tflops: float | None
    """Dense FP8 tensor-core peak, TFLOP/s (None: no FP8 tensor cores)."""
    memory_gb: float
    """HBM capacity in GB (10^9 bytes, as datasheets count)."""
    hbm_tb_per_s: float
    """HBM bandwidth, TB/s (bounds the optimizer step)."""
    intra_node_gb_per_s: float
    """Bandwidth one GPU can send to its node's peers, GB/s per direction (NVLink or PCIe)."""
    inter_node_gb_per_s: float
    """Bandwidth one GPU can send to other nodes, GB/s per direction (its InfiniBand NIC)."""
    gpus_per_node: int = 8
    """GPUs sharing the fast intra-node link."""
    links_note: str | None = None
    """Where measured link bandwidths replaced the datasheet's (plan/measured_links.py); None: none did."""

    def peak_tflops(self, precision: str) -> float:
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ConfigError(f"--precision fp8: the {self.name} has no FP8 tensor cores; use --precision bf16.")
            return self.fp8_tflops
        return self.bf16_tflops


GPUS = {
    "h100-sxm": GpuSpec("h100-sxm", 989.0, 1979.0, 80.0, 3.35, 450.0, 50.0),
    "h100-pcie": GpuSpec("h100-pcie", 756.0, 1513.0, 80.0, 2.0, 64.0, 50.0),
    "h200": GpuSpec("h200", 989.0, 1979.0, 141.0, 4.8, 450.0, 50.0),
    "a100": GpuSpec("a100", 312.0, None, 80.0, 2.039, 300.0, 25.0),
}


# Substrings of torch.cuda.get_device_name -> GPUS key, most specific first.
DEVICE_NAMES = (("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("H200", "h200"), ("A100", "a100"))


def gpu_for_device(device_name: str) -> GpuSpec | None:
    """The GPUS entry of a CUDA device name ("NVIDIA H100 80GB HBM3" -> h100-sxm), None if unlisted."""
    return next((GPUS[key] for part, key in DEVICE_NAMES if part in device_name), None)


def get_gpu(name: str, ib_gbps: float | None = None) -> GpuSpec:
    """The named GPU; `ib_gbps` (Gb/s per GPU) overrides its inter-node bandwidth."""
    if name not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; choose one of {sorted(GPUS)}.")
    spec = GPUS[name]
    if ib_gbps is not None:
        if ib_gbps <= 0:
            raise ConfigError(f"--ib-gbps must be positive, got {ib_gbps}.")
        spec = replace(spec, inter_node_gb_per_s=ib_gbps / 8)
    return spec
