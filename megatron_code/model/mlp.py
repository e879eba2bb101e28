"""SwiGLU MLP: linear_fc2(silu(x W_gate^T) * (x W_up^T))."""
import torch
import torch.nn.functional as F
from torch import nn

from kernels.fp8_mlp import fp8_swiglu_mlp
from kernels.swiglu import swiglu, swiglu_halves
from megatron_code.model.config import ModelConfig
from megatron_code.parallel.fused_wgrad import StepWeightCasts, fusable, fused_wgrad_linear
from megatron_code.parallel.layers import (
    SINGLE, RowParallelLinear, fp8_weight, gemm_input, local_linear, mark_tensor_parallel, row_parallel_output,
)
from megatron_code.parallel.state import ParallelState


class GateUpLinear(nn.Module):
    """The gate and up projections as one GEMM.

    The weight is stored as [2, ffn, hidden] (gate = weight[0], up = weight[1]) rather than
    [2 * ffn, hidden]: tensor parallelism then shards dim 1 into contiguous pieces that hold each
    rank's gate *and* up rows, so a checkpoint reshards with an ordinary even split.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.parallel = parallel
        weight = nn.Parameter(torch.empty(2, ffn_hidden_size // parallel.tp, hidden_size))
        self.weight = mark_tensor_parallel(weight, 1)
        self.fp8 = None  # Fp8LinearScaling, set by megatron_code.model.fp8.enable_fp8
        self.te = None  # TELinear under --fp8-backend te (megatron_code/model/te_linear.py)
        self.weight_casts: StepWeightCasts | None = None  # set by GPTModel (gradient_accumulation_fusion)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """x: [s, b, h] -> (gate, up), each [s, b, ffn / tp] (column parallel); in FP8 one tensor
        [s, b, 2 * ffn / tp] holding gate then up (kernels.swiglu_halves reads it as is)."""
        if self.te is not None:  # TE gathers a sequence-parallel input itself (in FP8)
            return self.te(x, self.weight, self.weight_casts)  # TE multiplies it as [2 ffn/tp, h]
        x = gemm_input(x, self.parallel)
        if self.fp8 is not None:  # one FP8 GEMM on [2 * ffn/tp, h]: one input cast, one weight scale
            return local_linear(x, self.weight, self.fp8, self.weight_casts)
        if self.weight_casts is not None and fusable(x, self.weight):
            return fused_wgrad_linear(x, self.weight, self.weight_casts)  # (gate, up), as below
        # Split the weight, not the output: two GEMMs on the contiguous [ffn/tp, h] halves give
        # contiguous gate/up (silu and mul run on contiguous memory) and a backward that stacks
        # the two small weight grads instead of [s, b, 2, ffn/tp] activation grads.
        w_gate, w_up = self.weight.unbind(0)
        return F.linear(x, w_gate), F.linear(x, w_up)


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE):
        super().__init__()
        self.linear_fc1 = GateUpLinear(config.hidden_size, config.ffn_hidden_size, parallel)
        self.linear_fc2 = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, parallel)
        self.swiglu_impl = config.swiglu_impl
        self.fp8_fused_swiglu = config.fp8_fused_swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h] ([s/tp, b, h] in and out under sequence parallelism)."""
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        if self.fp8_fused_swiglu and fc1.fp8 is not None and fc2.fp8 is not None:  # torch backend FP8
            x = gemm_input(x, fc1.parallel)
            y = fp8_swiglu_mlp(x, fp8_weight(x, fc1), fp8_weight(x, fc2), self.swiglu_impl)
            return row_parallel_output(y, fc2.parallel)
        gate_up = fc1(x)
        if isinstance(gate_up, tuple):
            return fc2(swiglu(*gate_up, self.swiglu_impl))
        return fc2(swiglu_halves(gate_up, self.swiglu_impl))
