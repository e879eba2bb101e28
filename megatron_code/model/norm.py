"""RMSNorm module (the math lives in kernels.rms_norm so fused versions can replace it)."""
import torch
from torch import nn

from kernels.rmsnorm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False, impl: str = "auto"):
        super().__init__()
        self.eps = eps
        self.impl = impl  # kernels.rmsnorm.RMSNORM_IMPLS
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.weight.tensor_parallel_dim = None
        # Under sequence parallelism each TP rank normalizes its own tokens, so the weight's
        # gradient is a partial sum that must be all-reduced over TP.
        self.weight.sequence_parallel_grad = sequence_parallel

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None):
        """x [..., h] (the residual stream) -> normalized [..., h]; given delta, the residual add
        fused into the norm (kernels.add_rms_norm): (x + delta, its norm). Under autocast the
        normalized output is stored in the autocast dtype: only GEMMs read it, which would cast it
        anyway, and the kernel rounds its fp32 result once, as that cast would (same values, one
        pass less). Both forms go through the module call, so its forward pre-hooks run (the
        parameter all-gather waits of --overlap-param-gather)."""
        if delta is None:
            return rms_norm(x, self.weight, self.eps, self.impl, self._out_dtype(x.dtype, x.device))
        dtype = torch.result_type(x, delta)
        return add_rms_norm(x, delta, self.weight, self.eps, self.impl, self._out_dtype(dtype, x.device))

    @staticmethod
    def _out_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
        if torch.is_autocast_enabled(device.type) and dtype == torch.float32:
            return torch.get_autocast_dtype(device.type)
        return None
