"""AdamW with decoupled weight decay on matrices only (clipping: megatron_code.parallel.grads).

Two implementations of the step (--optimizer-impl): torch.optim.AdamW (fused on CUDA, foreach on
CPU) and TritonAdamW, the same optimizer class, state and checkpoints with the update in a few
multi-tensor Triton launches (kernels/triton_adamw.py) that also write the next step's bf16 weight
copies; `auto` takes Triton on CUDA.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from kernels.dispatch import KernelSelectionError, check_choice, select, triton_module
from megatron_code.errors import ConfigError
from megatron_code.parallel.fused_wgrad import wanted_weight_copies
from megatron_code.training.config import OptimizerConfig

OPTIMIZER_IMPLS = ("auto", "torch", "triton")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; never norms or biases (1-D tensors), as Megatron does."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters; TritonAdamW also writes the model's per-step bf16 weight copies."""
    optimizer = adamw(parameter_groups(model, config.weight_decay), config, next(model.parameters()).is_cuda)
    if isinstance(optimizer, TritonAdamW):
        optimizer.write_weight_copies_for(model)
    return optimizer


def adamw(groups: list[dict], config: OptimizerConfig, on_cuda: bool) -> torch.optim.AdamW:
    """AdamW with the run's hyperparameters (shared by the distributed optimizer's shards), in the
    implementation config.optimizer_impl resolves to on this device."""
    hyper = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    if resolve_optimizer_impl(config.optimizer_impl, on_cuda) == "triton":
        return TritonAdamW(groups, **hyper)
    return torch.optim.AdamW(groups, **hyper, fused=on_cuda or None)  # one kernel on GPU; foreach on CPU


def check_optimizer_impl(impl: str) -> None:
    """Config-time check (name known, Triton importable): a ConfigError naming the choices."""
    try:
        check_choice("--optimizer-impl", impl, OPTIMIZER_IMPLS)
    except KernelSelectionError as err:
        raise ConfigError(str(err)) from None


def resolve_optimizer_impl(impl: str, on_cuda: bool) -> str:
    """'torch' or 'triton' for parameters on CUDA or not (Triton on CPU: its interpreter only)."""
    chosen = select("--optimizer-impl", impl, torch.device("cuda" if on_cuda else "cpu"), OPTIMIZER_IMPLS)
    return "torch" if chosen == "reference" else chosen


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (parameter groups, state keys, state_dict) whose step runs a few Triton
    launches for all parameters (kernels/triton_adamw.py): read p, grad, exp_avg, exp_avg_sq once,
    write p and both moments.

    Step counts live on the host (state["step"], a CPU tensor as in torch's unfused AdamW), so the
    bias corrections are kernel arguments rather than device reads. Clipping rides along as in
    torch's fused AdamW: when `grad_scale` (a one-element device tensor) is set, every gradient is
    divided by it inside the kernel (parallel/grads.py clip_in_optimizer_step sets it).

    Given the model (`write_weight_copies_for`), the step also writes the bf16 copies of the
    weights that the model's last training step cast (parallel/fused_wgrad.py StepWeightCasts) and
    hands them to the model's cast cache, so the next step's first micro-batch does not cast."""

    clips_in_step = True
    launch_per_parameter = False  # one launch per parameter instead of per group (benchmarks/bench_optimizer.py A/B)

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.grad_scale: torch.Tensor | None = None
        self.copies_for: torch.nn.Module | None = None

    def write_weight_copies_for(self, model: torch.nn.Module | None) -> None:
        """Write the low-precision weight copies `model`'s next training step will read (None: stop)."""
        self.copies_for = model

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("TritonAdamW.step takes no closure (the trainer computes the loss itself).")
        kernels = triton_module("triton_adamw")
        wanted = wanted_weight_copies(self.copies_for) if self.copies_for is not None else {}
        made = []
        for group in self.param_groups:
            by_step = defaultdict(list)  # parameters step together when their step counts agree
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_of(param)
                state["step"] += 1
                copy = None
                if id(param) in wanted:
                    cache, dtype = wanted[id(param)]
                    copy = torch.empty_like(param, dtype=dtype, memory_format=torch.contiguous_format)
                    made.append((cache, param, copy))
                by_step[int(state["step"].item())].append(kernels.AdamWTensors(
                    param, _dense(param.grad), state["exp_avg"], state["exp_avg_sq"], copy))
            beta1, beta2 = group["betas"]
            for step, tensors in by_step.items():
                for launch in ([t] for t in tensors) if self.launch_per_parameter else [tensors]:
                    kernels.adamw_step_(launch, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                        weight_decay=group["weight_decay"], step=step, grad_scale=self.grad_scale)
        for cache, param, copy in made:
            cache.prepare(param, copy)

    def _state_of(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            if not param.is_contiguous():
                raise ValueError(f"TritonAdamW: a parameter of shape {tuple(param.shape)} is not contiguous; "
                                 "use --optimizer-impl torch for such parameters.")
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return state


def _dense(grad: torch.Tensor) -> torch.Tensor:
    """The gradient in the parameter's (contiguous) layout: a copy only when autograd produced other strides."""
    if grad.is_sparse:
        raise ValueError("TritonAdamW does not take sparse gradients; use --optimizer-impl torch.")
    return grad.contiguous()


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
