"""Put the transformer layers' linear GEMMs in FP8 (torch backend: torch._scaled_mm).

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

FP8_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def scaling_config(config: ModelConfig) -> ScalingConfig:
    return ScalingConfig(fp8_format=config.fp8_format, recipe=config.fp8_recipe, margin=config.fp8_margin,
                         amax_history_len=config.fp8_amax_history_len,
                         amax_compute_algo=config.fp8_amax_compute_algo)


def fp8_layer_indices(config: ModelConfig) -> range:
    """Global indices of the layers that run in FP8."""
    return range(config.num_layers_at_start_in_bf16, config.num_layers - config.num_layers_at_end_in_bf16)


def enable_fp8(layers: nn.ModuleDict, config: ModelConfig) -> int:
    """Give the FP8 layers among `layers` (keyed by global index) FP8 scaling; returns how many."""
    if config.fp8_format is None:
        return 0
    chosen = [layer for index, layer in layers.items() if int(index) in fp8_layer_indices(config)]
    scaling = scaling_config(config)
    histories = new_histories(scaling)  # one set of buffers: a step advances every slot at once
    for layer in chosen:
        for path in FP8_LINEARS:
            layer.get_submodule(path).fp8 = Fp8LinearScaling(scaling, histories)
    return len(chosen)
