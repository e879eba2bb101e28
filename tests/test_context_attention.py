"""Context-parallel core attention without a mask: each of a rank's two chunks is a bottom-right
causal attention over the keys up to its end. It must equal full causal attention at the rank's
positions (and the explicit-mask path), values and gradients; on CUDA it must keep no mask."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

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


def test_context_parallel_attention_runs_under_a_dispatch_mode():
    """Tools run the model under TorchDispatchModes (torch's FlopCounterMode, the planner's memory
    probe), under which torch cannot construct the lower-right CausalBias subclass."""
    s = 24
    q, k, v = _inputs(s)
    chunks = local_chunks(s, 2, 1, "cpu")
    q_local = q.index_select(0, chunks.indices)
    attention = SDPAttention(ModelConfig())
    with FlopCounterMode(display=False), OpNames() as seen:
        out = attention(q_local, k, v, None, chunks)
    torch.testing.assert_close(out, attention(q_local, k, v, None, chunks))
    assert any("attention" in name for name in seen.names), seen.names


class OpNames(TorchDispatchMode):
    """The names of the ATen operators run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


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


def test_masked_attention_with_repeated_kv_heads_equals_grouped_query_attention():
    """masked_sdpa's CUDA path (KV heads repeated, so a masked kernel can run) against torch's
    enable_gqa, on CPU: same values and gradients under a document mask."""
    from megatron_code.model.core_attention import document_causal_mask, masked_sdpa

    q, k, v = (t.detach().permute(1, 2, 0, 3).requires_grad_() for t in _inputs(24))  # [b, n, s, d]
    mask = document_causal_mask(torch.tensor([[0] * 10 + [1] * 14, [0] * 24]))
    results = []
    for repeat in (False, True):
        out = masked_sdpa(q, k, v, mask, 0.0, repeat_kv=repeat)
        grads = torch.autograd.grad((out * torch.arange(16.0)).sum(), (q, k, v))
        results.append((out, *grads))
    for grouped, repeated in zip(*results):
        torch.testing.assert_close(repeated, grouped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_document_attention_keeps_no_score_matrix():
    """SFT's packed conversations (document masks) with grouped KV heads: the forward and backward
    of one 7B-shape layer's attention at seq 4096 must not hold torch's math kernel's fp32
    [b, nq, s, s] scores (2 GiB), which ran SFT out of memory on an H100."""
    s = 4096
    q, k, v = _inputs(s, "cuda", torch.bfloat16, b=1, nq=32, nkv=8, d=128)
    segment_ids = (torch.arange(s, device="cuda") >= 1500).long()[None]  # two documents
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = SDPAttention(ModelConfig())(q, k, v, segment_ids)
    out.float().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2**30, f"{extra / 2**30:.2f} GiB above the inputs"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_documents_run_torch_varlen_flash_like_the_masked_kernel():
    """Where torch has varlen_attn, packed documents on the sdpa backend run it (no mask, no work
    across documents): the same output and gradients as masked_sdpa, in less memory."""
    from megatron_code.model.core_attention import (document_causal_mask, masked_sdpa, packed_attention_kernel,
                                                    varlen_runs)

    s = 4096
    q, k, v = _inputs(s, "cuda", torch.bfloat16, b=2, nq=32, nkv=8, d=128)
    segment_ids = torch.stack([(torch.arange(s, device="cuda") >= 1500).long(),
                               torch.arange(s, device="cuda") // 1000])  # 2 and 5 documents
    if packed_attention_kernel() == "mask":
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    assert varlen_runs(q, 0.0)
    results, extra = [], []
    for use_varlen in (True, False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        if use_varlen:
            out = SDPAttention(ModelConfig())(q, k, v, segment_ids)
        else:
            mask = document_causal_mask(segment_ids)
            out = masked_sdpa(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), mask, 0.0)
            out = out.permute(2, 0, 1, 3).reshape(s, 2, -1)  # [b, n, s, d] -> [s, b, n*d]
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated() - before)
        results.append((out, *grads))
    for index, (varlen, masked) in enumerate(zip(*results)):
        torch.testing.assert_close(varlen.float(), masked.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{index}: {m}")
    assert extra[0] < extra[1], f"varlen {extra[0] / 2**20:.0f} MiB vs masked {extra[1] / 2**20:.0f} MiB"
