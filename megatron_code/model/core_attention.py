"""Core attention softmax(q k^T / sqrt(d)) v behind one interface, with three backends.

All backends take q: [s, b, nq, d], k/v: [s, b, nkv, d] (nq a multiple of nkv: GQA) and an optional
segment_ids: [b, s] for packed sequences (a token attends only to earlier tokens of its own
segment), and return [s, b, nq * d].

Under context parallelism q holds only this rank's s/cp tokens (two chunks, see
parallel/context.py) while k/v hold the whole sequence; `cp_chunks` (LocalChunks) says where the
queries sit. Each chunk is then a causal attention over the keys up to its own end, aligned
bottom-right (sdpa and flash backends); with document masks (segment_ids) the sdpa backend uses
an explicit mask instead.

Packed documents without CP on the sdpa backend run torch's variable-length flash kernel where it
exists (torch >= 2.10, CUDA, fp16/bf16): causal within each document, no mask, no s x s work
outside the documents; elsewhere the explicit mask (masked_sdpa).
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from megatron_code.model.config import ModelConfig
from megatron_code.parallel.context import LocalChunks, context_parallel_mask


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool mask, True where query i may attend to key j."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    return (causal & same_segment)[:, None]


_last_packing: tuple | None = None
"""(weak reference to a segment_ids tensor, its version counter, its packed_cu_seqlens result)."""


def packed_cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths of the batch flattened to b * s tokens (varlen kernels' input).

    A segment ends where the id changes or a sample ends. Returns (cu_seqlens int32 [n + 1], max len).
    Both need the device's values on the host (the number of segments, the longest), which waits
    for all queued work. Every layer of a forward (and of its recompute) gets the same segment_ids
    tensor, so the last result is kept for that tensor while it is unchanged: one wait per
    forward instead of one per layer.
    """
    if _last_packing is not None:
        tensor, version, result = _last_packing
        if tensor() is segment_ids and segment_ids._version == version:
            return result
    return _remember(segment_ids, _compute_cu_seqlens(segment_ids))


def pack_documents(segment_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host segment ids [b, s] -> the same on `device`, with their cu_seqlens and longest document
    found on the host and copied along (non-blocking), so that no layer waits for the device to
    find them (what Megatron-LM's PackedSeqParams, made by the data pipeline, are for)."""
    cu_seqlens, max_len = _compute_cu_seqlens(segment_ids)  # on the host: no wait
    if device.type == "cuda":  # pinned: a non-blocking copy from pageable memory may be staged synchronously
        segment_ids, cu_seqlens = segment_ids.pin_memory(), cu_seqlens.pin_memory()
    on_device = segment_ids.to(device, non_blocking=True)
    _remember(on_device, (cu_seqlens.to(device, non_blocking=True), max_len))
    return on_device


def _remember(segment_ids: torch.Tensor, result: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, int]:
    global _last_packing
    _last_packing = (weakref.ref(segment_ids), segment_ids._version, result)
    return result


def _compute_cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    b, s = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_positions = starts.flatten().nonzero().flatten()
    total = torch.tensor([b * s], device=segment_ids.device)
    cu_seqlens = torch.cat((start_positions, total)).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


@functools.cache
def torch_varlen_attn():
    """(varlen_attn, its causal keyword arguments, whether it takes grouped KV heads) from
    torch.nn.attention.varlen, or None. Its signature moved between releases: torch 2.10 says
    causal with is_causal=True, later ones with window_size=(-1, 0); enable_gqa came later still."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def packed_attention_kernel(device_type: str = "cuda") -> str:
    """What the sdpa backend runs for packed documents (no CP) on this torch: 'varlen' (flash,
    grouped KV heads), 'varlen-repeat-kv' (flash on KV heads repeated to the query heads) or
    'mask' (masked_sdpa). The planner's memory model asks too (plan/activations.py)."""
    found = torch_varlen_attn() if device_type == "cuda" else None
    if found is None:
        return "mask"
    return "varlen" if found[2] else "varlen-repeat-kv"


def varlen_runs(q: torch.Tensor, dropout: float) -> bool:
    """Whether torch's varlen flash kernel takes these queries ([s, b, nq, d]): CUDA, fp16/bf16, a
    head dim flash supports, no dropout (varlen_attn has none)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and packed_attention_kernel() != "mask")


def varlen_document_attention(q, k, v, segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed document: q [s, b, nq, d], k/v [s, b, nkv, d],
    segment_ids [b, s] -> [s, b, nq * d], through torch's varlen flash kernel (varlen_runs)."""
    varlen_attn, causal, takes_gqa = torch_varlen_attn()
    s, b, nq, d = q.shape
    cu_seqlens, max_len = packed_cu_seqlens(segment_ids)
    q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (q, k, v))  # [s, b, n, d] -> [t, n, d]
    extra = dict(causal)
    if k.shape[1] != nq:
        if takes_gqa:
            extra["enable_gqa"] = True
        else:  # query head i reads KV head i // (nq / nkv), as enable_gqa would
            k, v = (t.repeat_interleave(nq // k.shape[1], dim=1) for t in (k, v))  # [t, nkv, d] -> [t, nq, d]
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **extra)
    return out.reshape(b, s, nq * d).transpose(0, 1)  # [t, nq, d] -> [s, b, nq*d]


def masked_sdpa(q, k, v, mask: torch.Tensor, dropout: float, repeat_kv: bool | None = None) -> torch.Tensor:
    """SDPA with an explicit mask: q [b, nq, s, d], k/v [b, nkv, s_k, d] -> [b, nq, s, d].

    On CUDA, torch's kernels that take a mask (memory-efficient, cuDNN) do not take grouped KV
    heads (enable_gqa runs only in the flash and math kernels), and the math kernel keeps an fp32
    [b, nq, s, s_k] score tensor per layer for backward: 2 GiB per layer at seq 4096 with 32 heads,
    which ran SFT of the 7B shape out of memory on an H100 (2026-11-26). So there (repeat_kv,
    default: on CUDA) the KV heads are repeated to nq, as enable_gqa would (query head i reads KV
    head i // (nq / nkv)), and a masked kernel runs on O(s) memory."""
    repeat_kv = q.is_cuda if repeat_kv is None else repeat_kv
    if repeat_kv and k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))  # [b, nkv, s_k, d] -> [b, nq, s_k, d]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=True)


class SDPAttention(nn.Module):
    """torch.nn.functional.scaled_dot_product_attention: runs on CPU and GPU (flash/cuDNN/efficient
    kernels are picked by torch on CUDA)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dropout = config.attention_dropout

    def forward(self, q, k, v, segment_ids=None, cp_chunks=None):
        dropout = self.dropout if self.training else 0.0
        if segment_ids is not None and cp_chunks is None and varlen_runs(q, dropout):
            return varlen_document_attention(q, k, v, segment_ids)
        s, b, nq, d = q.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, d]
        if cp_chunks is not None and segment_ids is None:
            out = self._context_parallel_causal(q, k, v, cp_chunks, dropout)
        elif cp_chunks is not None:
            out = masked_sdpa(q, k, v, context_parallel_mask(cp_chunks.indices, k.shape[2], segment_ids), dropout)
        elif segment_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True)
        else:
            out = masked_sdpa(q, k, v, document_causal_mask(segment_ids), dropout)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)  # [b, n, s, d] -> [s, b, n*d]

    @staticmethod
    def _context_parallel_causal(q, k, v, chunks: LocalChunks, dropout: float) -> torch.Tensor:
        """q [b, nq, 2c, d] (this rank's two chunks), k/v [b, nkv, s, d] -> [b, nq, 2c, d]. A
        lower-right causal bias is no tensor: on CUDA torch runs the flash kernel (which aligns
        causality bottom-right), so no [s/cp, s] mask is built or kept for backward."""
        outs = []
        for q_chunk, end in zip(q.split(chunks.length, dim=2), chunks.key_ends()):
            bias = _lower_right_causal(chunks.length, end)
            outs.append(F.scaled_dot_product_attention(q_chunk, k[:, :, :end], v[:, :, :end], attn_mask=bias,
                                                       dropout_p=dropout, enable_gqa=True))
        return torch.cat(outs, dim=2)


def _lower_right_causal(q_len: int, kv_len: int):
    """torch's lower-right CausalBias, constructed with any TorchDispatchMode set aside: torch
    cannot construct a Tensor subclass under one ("the raw Tensor object is already associated to
    a python object"), and tools run the model under such modes (torch's FlopCounterMode, the
    planner's memory probe, plan/measure.py). The bias holds no data for a mode to see."""
    with _disable_current_modes():
        return causal_lower_right(q_len, kv_len)


class FlashAttention(nn.Module):
    """flash-attn 2/3 kernels (CUDA only). GQA is native; packed sequences use the varlen kernel."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        import flash_attn  # guarded by ModelConfig.validate, which names the install command

        self.flash_attn = flash_attn
        self.dropout = config.attention_dropout

    def forward(self, q, k, v, segment_ids=None, cp_chunks=None):
        assert cp_chunks is None or segment_ids is None, "validated earlier: CP + packed documents need sdpa"
        s, b, nq, d = q.shape
        dropout = self.dropout if self.training else 0.0
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [b, s, n, d]
        if cp_chunks is not None:  # flash-attn aligns causality bottom-right when s_q < s_k
            outs = [self.flash_attn.flash_attn_func(q_chunk, k[:, :end], v[:, :end], dropout_p=dropout, causal=True)
                    for q_chunk, end in zip(q.split(cp_chunks.length, dim=1), cp_chunks.key_ends())]
            out = torch.cat(outs, dim=1)
        elif segment_ids is None:
            out = self.flash_attn.flash_attn_func(q, k, v, dropout_p=dropout, causal=True)
        else:
            cu_seqlens, max_len = packed_cu_seqlens(segment_ids)
            q, k, v = (t.reshape(b * s, t.shape[2], d) for t in (q, k, v))  # [t, n, d]
            out = self.flash_attn.flash_attn_varlen_func(
                q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout, causal=True
            )
        return out.reshape(b, s, nq * d).transpose(0, 1)  # [b, s, n*d] -> [s, b, n*d]


class TEAttention(nn.Module):
    """Transformer Engine's DotProductAttention (cuDNN fused attention; FP8-aware)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        import transformer_engine.pytorch as te  # guarded by ModelConfig.validate

        common = dict(
            num_attention_heads=config.num_attention_heads,
            kv_channels=config.head_dim,
            num_gqa_groups=config.num_kv_heads,
            attention_dropout=config.attention_dropout,
        )
        # Outside the module tree: they hold no parameters, only FP8 metadata (`_extra_state`) that
        # would put keys into the model's state dict the sdpa/flash backends lack, so checkpoints
        # would not load across attention backends (found on an H100, 2026-11-26).
        self.__dict__["te_modules"] = {
            "causal": te.DotProductAttention(qkv_format="sbhd", attn_mask_type="causal", **common),
            "packed": te.DotProductAttention(qkv_format="thd", attn_mask_type="padding_causal", **common),
        }

    def _attention(self, kind: str) -> nn.Module:
        module = self.te_modules[kind]
        module.training = self.training  # attention dropout follows our train()/eval()
        return module

    def forward(self, q, k, v, segment_ids=None, cp_chunks=None):
        assert cp_chunks is None, "context parallelism runs on the sdpa or flash backend (validated earlier)"
        s, b, nq, d = q.shape
        if segment_ids is None:
            return self._attention("causal")(q, k, v)  # [s, b, n*d]
        cu_seqlens, max_len = packed_cu_seqlens(segment_ids)
        q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (q, k, v))  # [t, n, d]
        out = self._attention("packed")(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_len, max_seqlen_kv=max_len,
        )
        return out.reshape(b, s, nq * d).transpose(0, 1)  # [t, n*d] -> [s, b, n*d]


CORE_ATTENTION = {"sdpa": SDPAttention, "flash": FlashAttention, "te": TEAttention}


def build_core_attention(config: ModelConfig) -> nn.Module:
    return CORE_ATTENTION[config.attention_backend](config)
