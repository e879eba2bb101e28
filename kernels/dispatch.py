"""Which implementation of a kernel runs: one selection rule shared by every kernel.

    auto       Triton on CUDA tensors when `import triton` works, else the plain-torch reference
    triton     the Triton kernels (CUDA; on CPU only under Triton's interpreter, TRITON_INTERPRET=1)
    reference  the plain-torch implementation (any device; the numerical ground truth of the tests)
    te, apex   Transformer Engine / NVIDIA apex equivalents, where a kernel has one

A choice that cannot run (package missing, CPU tensors without the interpreter) raises
KernelSelectionError naming the kernel, the choice and the fix; nothing silently falls back.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

# Packages behind the optional implementations, with the command that installs each one.
INSTALL = {
    "triton": ("triton", "pip install triton (CUDA builds of torch ship it)"),
    "te": ("transformer_engine", "pip install 'transformer-engine[pytorch]' (needs CUDA; see docs/install.md)"),
    "apex": ("apex", "build NVIDIA apex from source: pip install -v --no-build-isolation "
                     "git+https://github.com/NVIDIA/apex (needs CUDA; PyPI's 'apex' is an unrelated package)"),
}


class KernelSelectionError(ValueError):
    """A kernel implementation was asked for that cannot run here."""


@functools.cache
def package_imports(module: str) -> bool:
    """True when `module` imports (a present but broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_choice(kernel: str, impl: str, choices: tuple[str, ...]) -> None:
    """Device-independent checks (name known, package importable): usable at config time."""
    if impl not in choices:
        raise KernelSelectionError(f"{kernel}: implementation must be one of {choices}, got {impl!r}.")
    if impl in INSTALL and not package_imports(INSTALL[impl][0]):
        module, how = INSTALL[impl]
        raise KernelSelectionError(
            f"{kernel}: implementation {impl!r} needs the '{module}' package, which does not import here. "
            f"Install it with: {how}. Or choose 'reference' (plain torch, any device)."
        )


def select(kernel: str, impl: str, device: torch.device, choices: tuple[str, ...]) -> str:
    """The concrete implementation (never 'auto') for a call on tensors living on `device`."""
    if impl == "auto":
        use_triton = "triton" in choices and device.type == "cuda" and package_imports("triton")
        return "triton" if use_triton else "reference"
    check_choice(kernel, impl, choices)
    if impl == "triton" and device.type != "cuda":
        if device.type != "cpu" or not triton_interpreter_enabled():
            raise KernelSelectionError(
                f"{kernel}: implementation 'triton' got {device.type.upper()} tensors. Triton kernels run on CUDA, "
                "or on CPU through Triton's interpreter when TRITON_INTERPRET=1 is set before the first kernel "
                "is defined (about 1000x slower: for tests only). Choose 'auto' or 'reference' instead."
            )
    if impl in ("te", "apex") and device.type != "cuda":
        raise KernelSelectionError(f"{kernel}: implementation {impl!r} needs CUDA tensors, got {device.type}.")
    return impl


def triton_module(name: str):
    """Import kernels.<name> (Triton kernel definitions) on first use: triton.jit decides between
    compiled and interpreted kernels when the module is imported, so it must not happen at
    `import kernels` time (and the package must work where Triton is not installed)."""
    return importlib.import_module(f"kernels.{name}")
