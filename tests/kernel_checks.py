"""Helpers shared by the kernel tests (tests/test_kernels.py on CPU, tests/test_kernels_cuda.py on GPU)."""
import torch

from kernels.rotary import apply_rotary_emb_qk


def forward_and_grads(fn, inputs, seed=1):
    """Outputs of fn(*inputs) and the gradients of a random weighted sum of them w.r.t. inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    device = outputs[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    sum((out.float() * torch.randn(out.shape, generator=gen, device=device)).sum() for out in outputs).backward()
    return [out.detach() for out in outputs] + [leaf.grad for leaf in leaves]


def rope_on_fused_qkv(impl: str, q_per_kv: int, cos: torch.Tensor, sin: torch.Tensor):
    """qkv [s, b, kv, q_per_kv + 2, d] -> RoPE'd (q, k), with q a reshaped copy and k a strided
    view of the fused QKV output (the kernels accept either layout)."""
    def run(qkv):
        s, b, kv, _, d = qkv.shape
        q = qkv[:, :, :, :q_per_kv].reshape(s, b, kv * q_per_kv, d)
        return apply_rotary_emb_qk(q, qkv[:, :, :, q_per_kv], cos, sin, impl)
    return run
