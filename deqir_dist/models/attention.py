"""Self-attention over pixels in memory linear in the number of pixels.

The public UNets (ADM, DDPM) attend over every pixel of a feature map: T = H * W tokens, so the
explicit softmax(q k^T / sqrt(d)) v holds a T x T matrix per head (a 640x428 output's 160x107
mid-block map: 17,120 tokens, 1.2 GB per head in float32). :func:`attend` computes the same
weights with ``torch.nn.functional.scaled_dot_product_attention``, whose fused kernels (flash
attention on CPU and CUDA) never form that matrix. Where no fused kernel applies it falls back to
the explicit product one block of queries at a time (``_attend_chunked``), so peak memory stays
at ``max_logits`` entries whatever the size. Both equal the explicit formula up to float rounding
(``tests/test_models.py`` pins them against it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest T x T block the chunked fallback forms at once (entries, per call): 2^24 float32 = 64 MiB.
MAX_LOGITS = 1 << 24


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit formula the models were written with (the test oracle): q, k, v (N, T, d) ->
    (N, T, d), weights softmax_s(q_t . k_s / sqrt(d)) computed in float32."""
    w = torch.einsum("ntd,nsd->nts", q.float(), k.float()) * (q.shape[-1] ** -0.5)
    return torch.einsum("nts,nsd->ntd", torch.softmax(w, dim=-1), v.float()).to(q.dtype)


def _attend_chunked(q, k, v, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    n, t, d = q.shape
    step = max(1, max_logits // max(1, n * k.shape[1]))
    out = torch.empty_like(q)
    for lo in range(0, t, step):
        out[:, lo:lo + step] = attend_reference(q[:, lo:lo + step], k, v)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (N, T, d), never forming the (T, T) matrix."""
    if q.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        # the fused CPU kernel needs the feature dim contiguous: the UNets pass (N, C, T) maps
        # transposed to (N, T, C), for which SDPA silently takes its math path (a T x T matrix)
        q, k, v = (a.contiguous() for a in (q, k, v))
        try:
            return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        except RuntimeError:            # no fused kernel for this device / dtype / layout
            pass
    return _attend_chunked(q, k, v)
