"""--fp8-backend te: the FP8 layers' GEMMs run in Transformer Engine's `Linear` under `te.autocast`.

What changes against the torch backend (megatron_code/model/fp8.py) is only who runs the four
GEMMs of an FP8 layer (linear_qkv, linear_proj, linear_fc1, linear_fc2): each of our linear modules
keeps its parameter (same name, shape, initialization and checkpoint layout under either backend;
a checkpoint moves freely between them) and hands it to a private `te.Linear` at call time, the
way kernels/rmsnorm.py lends our norm weight to TE's RMSNorm. TE then does what it does in
Megatron-LM: FP8 casts with its recipe's scaling, the tensor-parallel communication inside the
GEMM modules (column: all-gather of the sequence-parallel input, in FP8; row: all-reduce or
reduce-scatter), and amax reduction over the data x context x tensor-parallel ranks at the end of
each `te.autocast` region (one per forward of a block: TransformerBlock.forward).

The private `te.Linear` is built on the meta device (its own weight is never materialized) and
kept out of the module tree (no duplicate parameter, nothing extra in state dicts; its FP8
state goes to the checkpoint's per-rank fp8/ files, megatron_code/training/checkpointing.py).

Nothing here imports Transformer Engine until a TE layer is built; ModelConfig.validate refuses
`--fp8-backend te` where the package does not import. Transformer Engine needs CUDA.
"""
from __future__ import annotations

import functools
import importlib
import os
from contextlib import nullcontext

import torch
from torch import nn

from kernels.grad_accumulation import fp32_gradient
from megatron_code.errors import ConfigError
from megatron_code.parallel.fused_wgrad import StepWeightCasts
from megatron_code.parallel.state import ParallelState

TE_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}


def recipe_spec(config) -> tuple[str, dict]:
    """Our FP8 flags as a Transformer Engine recipe: (class name in transformer_engine.common.recipe,
    constructor arguments with the format as a `Format` member name)."""
    fmt = TE_FORMATS[config.fp8_format]
    if config.fp8_recipe == "delayed":
        return "DelayedScaling", {"fp8_format": fmt, "margin": config.fp8_margin,
                                  "amax_history_len": config.fp8_amax_history_len,
                                  "amax_compute_algo": config.fp8_amax_compute_algo}
    return "Float8CurrentScaling", {"fp8_format": fmt}


def build_recipe(config):
    """The transformer_engine.common.recipe object for the config's FP8 flags."""
    recipes = importlib.import_module("transformer_engine.common.recipe")
    name, kwargs = recipe_spec(config)
    recipe_class = getattr(recipes, name, None)
    if recipe_class is None:
        raise ConfigError(f"--fp8-recipe {config.fp8_recipe} needs Transformer Engine's recipe.{name}, "
                          "which this version lacks: upgrade transformer-engine.")
    return recipe_class(**{**kwargs, "fp8_format": recipes.Format[kwargs["fp8_format"]]})


def fp8_region(config, parallel: ParallelState, fp8_layers: int):
    """What TransformerBlock.forward enters around its layers: under --fp8-backend te with FP8
    layers, a factory of the `te.autocast` context (amaxes reduced over ParallelState.amax_group);
    else a no-op."""
    if config.fp8_backend != "te" or not fp8_layers:
        return nullcontext
    te = importlib.import_module("transformer_engine.pytorch")
    recipe, group = build_recipe(config), parallel.amax_group
    if hasattr(te, "autocast"):  # TE 2.20 has both names; fp8_autocast is the older one and warns
        return functools.partial(te.autocast, enabled=True, recipe=recipe, amax_reduction_group=group)
    return functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=recipe, fp8_group=group)


class TELinear(nn.Module):
    """The GEMM of one of our linear layers, run by a private te.Linear.

    The owner passes its parameter at each call as the [out, in] matrix TE multiplies: the
    parameter itself, or GateUpLinear's [2, ffn/tp, h] viewed as [2 ffn/tp, h] (gate rows, then up)."""

    def __init__(self, in_features: int, out_features: int, mode: str, parallel: ParallelState,
                 params_dtype: torch.dtype):
        super().__init__()
        te = importlib.import_module("transformer_engine.pytorch")
        linear = te.Linear(in_features, out_features, bias=False, parallel_mode=mode,
                           tp_group=parallel.tp_group if parallel.tp > 1 else None, tp_size=parallel.tp,
                           sequence_parallel=parallel.sequence_parallel, params_dtype=params_dtype,
                           device="meta")
        self.__dict__["te_linear"] = linear  # outside the module tree: see the module docstring

    def forward(self, x: torch.Tensor, weight: torch.Tensor, weight_casts: StepWeightCasts | None) -> torch.Tensor:
        """x: [s(/tp), b, in] -> [s(/tp), b, out / tp] (column) or [s(/tp), b, out] (row); weight:
        the owner's parameter ([out, in], or GateUpLinear's [2, ffn/tp, h]). Within a training step
        (weight_casts active), TE casts the weight to FP8 in the first micro-batch and reuses the
        cast in the others, and writes the weight gradient into the fp32 `.grad` itself."""
        linear = self.te_linear
        first = weight_casts.first_use(self) if weight_casts is not None else None
        lent = weight if weight.dim() == 2 else weight.flatten(0, 1)  # [2, ffn/tp, h] -> [2 ffn/tp, h]: gate, up rows
        fuse = first is not None and torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
        if fuse:
            lent = self._lend_gradient(weight, weight_casts.memo(weight, "te-lent", lambda: lent), first)
        linear.fuse_wgrad_accumulation = fuse  # read by te.Linear at each call
        linear._parameters["weight"] = lent  # ours, lent for this call (TE reads getattr(self, "weight"))
        linear.training = self.training
        return linear(x, is_first_microbatch=first)

    def _lend_gradient(self, weight: torch.Tensor, lent: torch.Tensor, first: bool) -> torch.Tensor:
        """TE's gradient-accumulation fusion (Megatron-LM's): the weight-gradient GEMM writes (first
        micro-batch) or adds (the others) its fp32 output into `lent.main_grad`, here a view of our
        `.grad`, and returns no gradient, so autograd adds nothing (the post-accumulate hooks of the
        data-parallel buckets still run). TE finds `main_grad` through a weak reference to the
        tensor it was given: `lent` is the same object for the whole step (memoized by the caller)."""
        grad, _ = fp32_gradient(weight, torch.empty_like if first else torch.zeros_like)
        lent.main_grad = grad.view(lent.shape)
        self.__dict__["lent"] = lent  # not a submodule attribute: it may be our Parameter
        return lent

    def release_step_state(self) -> None:
        """At the end of a training step: free the FP8 weight (and its transpose) TE cached for the
        step's other micro-batches, 2 bytes per weight element, as the torch backend frees its
        casts (the next step's first micro-batch casts again), and drop the `main_grad` reference,
        which would keep a gradient the optimizer frees alive into the next step."""
        self.te_linear._fp8_workspaces.clear()
        lent = self.__dict__.pop("lent", None)
        if lent is not None and hasattr(lent, "main_grad"):
            del lent.main_grad


def te_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: te.Linear} of a model's TE-run layers, in module order (no TE import)."""
    return {name: m.te_linear for name, m in model.named_modules() if isinstance(m, TELinear)}


# TE 2.20 refuses to unpickle delayed-scaling extra state unless this is set (its payload is a
# pickle). Ours comes from this run's own checkpoint files, which checkpointing.py already loads
# with torch.load(weights_only=False): the same trust, granted for the duration of the load.
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def te_fp8_state(model: nn.Module) -> dict:
    """{module name: serialized FP8 metadata (amax histories, scales)} of the TE linears."""
    return {name: linear.get_extra_state() for name, linear in te_linears(model).items()}


def load_te_fp8_state(model: nn.Module, saved: dict) -> None:
    """Restore what te_fp8_state saved, into a model with the same TE linears."""
    previous = os.environ.get(UNSAFE_PICKLE_ENV)
    os.environ[UNSAFE_PICKLE_ENV] = "1"
    try:
        for name, linear in te_linears(model).items():
            linear.set_extra_state(saved[name])
    finally:
        if previous is None:
            del os.environ[UNSAFE_PICKLE_ENV]
        else:
            os.environ[UNSAFE_PICKLE_ENV] = previous
