"""Put the transformer layers' linear GEMMs in FP8: torch backend (torch._scaled_mm, scaling in
kernels/fp8_*.py) or te backend (Transformer Engine's Linear, megatron_code/model/te_linear.py).

Which GEMMs: linear_qkv, linear_proj, linear_fc1 (gate+up) and linear_fc2 of every layer except the
first `num_layers_at_start_in_bf16` and last `num_layers_at_end_in_bf16`. The embedding, the output
layer (logits) and attention's softmax(QK^T)V stay in the compute dtype, as in Megatron-LM and
Transformer Engine recipes: they are the most precision-sensitive and a small share of the FLOPs.
Each linear gets its own scale slots (input, weight, output gradient); nothing else changes, so
checkpoints, tensor/sequence parallelism and pipeline stages work the same with and without FP8.
"""
from __future__ import annotations

from torch import nn

from kernels.fp8_linear import Fp8LinearScaling
from kernels.fp8_scaling import ScalingConfig, new_histories
from megatron_code.model.config import ModelConfig
from megatron_code.parallel.state import ParallelState

FP8_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
# How each of them is split under tensor parallelism (Transformer Engine's parallel_mode).
TP_MODES = {"self_attention.linear_qkv": "column", "self_attention.linear_proj": "row",
            "mlp.linear_fc1": "column", "mlp.linear_fc2": "row"}


def scaling_config(config: ModelConfig) -> ScalingConfig:
    return ScalingConfig(fp8_format=config.fp8_format, recipe=config.fp8_recipe, margin=config.fp8_margin,
                         amax_history_len=config.fp8_amax_history_len,
                         amax_compute_algo=config.fp8_amax_compute_algo)


def fp8_layer_indices(config: ModelConfig) -> range:
    """Global indices of the layers that run in FP8."""
    return range(config.num_layers_at_start_in_bf16, config.num_layers - config.num_layers_at_end_in_bf16)


def describe_fp8(config: ModelConfig) -> str:
    """One phrase for the startup summary: '' without FP8."""
    if config.fp8_format is None:
        return ""
    layers = fp8_layer_indices(config)
    return (f" + FP8 {config.fp8_format} {config.fp8_recipe} ({config.fp8_backend} backend) in layers "
            f"{layers.start}-{layers.stop - 1}")


def enable_fp8(layers: nn.ModuleDict, config: ModelConfig, parallel: ParallelState | None = None) -> int:
    """Give the FP8 layers among `layers` (keyed by global index) FP8 scaling (torch backend) or
    Transformer Engine GEMMs (te backend; needs `parallel`); returns how many layers."""
    if config.fp8_format is None:
        return 0
    chosen = [layer for index, layer in layers.items() if int(index) in fp8_layer_indices(config)]
    if config.fp8_backend == "te":
        for layer in chosen:
            for path in FP8_LINEARS:
                _attach_te(layer.get_submodule(path), TP_MODES[path], parallel, config.torch_params_dtype)
        return len(chosen)
    scaling = scaling_config(config)
    histories = new_histories(scaling)  # one set of buffers: a step advances every slot at once
    for layer in chosen:
        for path in FP8_LINEARS:
            layer.get_submodule(path).fp8 = Fp8LinearScaling(scaling, histories, config.fp8_wgrad_impl)
    return len(chosen)


def _attach_te(module: nn.Module, mode: str, parallel: ParallelState, params_dtype) -> None:
    """Give one of our linears a te.Linear of its global shape; its weight stays the owner's."""
    from megatron_code.model.te_linear import TELinear  # imports Transformer Engine

    rows, cols = module.weight.flatten(0, -2).shape  # this rank's [out, in] ([2, ffn/tp, h] -> [2 ffn/tp, h])
    out_features, in_features = (rows * parallel.tp, cols) if mode == "column" else (rows, cols * parallel.tp)
    module.te = TELinear(in_features, out_features, mode, parallel, params_dtype)
