"""Context-parallel core attention without a mask: each of a rank's two chunks is a bottom-right
causal attention over the keys up to its end. It must equal full causal attention at the rank's
positions (and the explicit-mask path), values and gradients; on CUDA it must keep no mask."""
import pytest
import torch
import torch.nn.functional as F

from megatron_code.model.config import ModelConfig
from megatron_code.model.core_attention import SDPAttention
from megatron_code.parallel.context import local_chunks


def _inputs(s, device="cpu", dtype=torch.float32, b=2, nq=4, nkv=2, d=16):
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, b, n, d, device=device, dtype=dtype, generator=gen, requires_grad=True)
            for n in (nq, nkv, nkv)]


def _full_causal(q, k, v):
    """Single-process reference: [s, b, n, d] -> [s, b, nq * d]."""
    s, b, nq, d = q.shape
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)


@pytest.mark.parametrize("cp", [2, 3])
def test_chunked_context_parallel_attention_equals_full_causal_attention(cp):
    s = 12 * cp
    q, k, v = _inputs(s)
    reference = _full_causal(q, k, v)
    grad_out = torch.randn_like(reference)
    ref_grads = torch.autograd.grad(reference, (q, k, v), grad_out)
    attention = SDPAttention(ModelConfig())
    summed = [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(cp):
        chunks = local_chunks(s, cp, rank, "cpu")
        q_local = q.index_select(0, chunks.indices)
        out = attention(q_local, k, v, None, chunks)
        torch.testing.assert_close(out, reference.index_select(0, chunks.indices), rtol=1e-5, atol=1e-6)
        masked = attention(q_local, k, v, torch.zeros(2, s, dtype=torch.long), chunks)  # explicit-mask path
        torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.index_select(0, chunks.indices))
        summed = [a + g for a, g in zip(summed, grads)]  # CP sums K/V gradients over ranks
    for got, want in zip(summed, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunk_geometry():
    chunks = local_chunks(32, 4, 1, "cpu")
    assert (chunks.first, chunks.second, chunks.length) == (1, 6, 4)
    assert chunks.key_ends() == (8, 28)
    assert chunks.indices.tolist() == [4, 5, 6, 7, 24, 25, 26, 27]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the flash kernel keeps no mask)")
def test_cuda_context_parallel_attention_keeps_no_mask():
    s, cp = 8192, 4
    q, k, v = _inputs(s, "cuda", torch.bfloat16, b=1, nq=32, nkv=8, d=128)
    chunks = local_chunks(s, cp, 0, "cuda")
    q_local = q.detach().index_select(0, chunks.indices).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = SDPAttention(ModelConfig())(q_local, k, v, None, chunks)
    # A mask (or score matrix) is [..., queries, keys]: both trailing dims at least a chunk long.
    # q/k/v/out end in the head dim (128), the log-sum-exp in the queries.
    square = [shape for shape in saved if len(shape) >= 2 and min(shape[-2:]) >= chunks.length]
    assert saved and not square, saved
    out.float().sum().backward()
    assert torch.isfinite(k.grad).all()
