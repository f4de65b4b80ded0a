"""Prefill scores: decayed column sums of the causal attention probabilities of a prompt's last queries.

    scores[kv, j] = sum_{q in last W queries} decay^(T-1-q) * sum_{h in group kv} softmax_j(sm_scale * q_h . k_j)

over causal keys j <= q. With ``decay < 1`` only the last ``W = decay_window(decay)`` queries matter to float32
(ZEROMERGE.md), so no T x T matrix is formed; with ``decay = 1`` and a short window this is the SnapKV /
windowed variant (pool afterwards with ``pool_scores``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None


def decay_window(decay: float, t: int, eps: float = 1e-9) -> int:
    """Number of last queries whose decayed weight exceeds ``eps`` (all ``t`` when decay >= 1)."""
    if decay >= 1.0:
        return t
    if decay <= 0.0:
        return 1
    return min(t, int(math.ceil(math.log(eps) / math.log(decay))) + 1)


def prefill_scores_ref(
    q: Tensor, k: Tensor, *, decay: float, sm_scale: float | None = None, lse: Tensor | None = None,
    chunk: int = 256,
) -> Tensor:
    """Plain-torch reference (fp32), chunked over queries.

    Args:
        q: (H, W, D) the prompt's last W queries (positions T-W .. T-1), after RoPE.
        k: (Hkv, T, D) the prompt's keys, after RoPE.
        lse: optional (H, W) fp32 natural-log log-sum-exp of each query's causal logits, as the attention that
            produced the outputs returns it: probabilities are then exp(logit - lse) instead of a softmax.
    Returns:
        (Hkv, T) fp32 scores.

    Traffic: reads K once per query chunk (ceil(W/chunk) passes); holds at most H*chunk*T fp32 logits.
    """
    n_heads, n_q, d = q.shape
    n_kv, t, _ = k.shape
    g = n_heads // n_kv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    kf = k.float()
    out = torch.zeros(n_kv, t, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(t, device=q.device)
    # one chunk without a loop when the queries fit (a lookahead's draft: the compiled rescore's query count is
    # symbolic, and a range over it would fix it)
    for c0 in range(0, n_q, chunk) if n_q > chunk else (0,):
        c1 = min(n_q, c0 + chunk) if n_q > chunk else n_q
        qc = q[:, c0:c1].float().reshape(n_kv, g, c1 - c0, d)
        logits = torch.einsum("hgcd,htd->hgct", qc, kf) * sm_scale  # (Hkv, G, C, T)
        q_pos = t - n_q + torch.arange(c0, c1, device=q.device)
        logits = logits.masked_fill(key_pos.view(1, -1) > q_pos.view(-1, 1), float("-inf"))
        if lse is None:
            p = torch.softmax(logits, dim=-1)
        else:
            p = torch.exp(logits - lse[:, c0:c1].float().reshape(n_kv, g, c1 - c0, 1))
        wts = torch.pow(torch.tensor(decay, dtype=torch.float64), (t - 1 - q_pos).double()).float()
        out += torch.einsum("hgct,c->ht", p, wts)
    return out


def pool_scores(scores: Tensor, kernel: int | None) -> Tensor:
    """Max-pool scores (..., T) over neighbouring positions (stride 1, same length)."""
    if not kernel or kernel <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    return F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)[..., : shape[-1]].reshape(shape)


def prefill_scores(
    q: Tensor, k: Tensor, *, decay: float, sm_scale: float | None = None, lse: Tensor | None = None,
    backend: str = "torch",
) -> Tensor:
    """Prefill scores (see module docstring); ``backend`` is "torch" or "triton". With ``lse`` (the queries' log-sum-exp
    from the prompt's attention) the Triton path skips its first pass."""
    if backend == "triton":
        return prefill_scores_triton(q, k, decay=decay, sm_scale=sm_scale, lse=lse)
    return prefill_scores_ref(q, k, decay=decay, sm_scale=sm_scale, lse=lse)


# ----------------------------------------------------------------------------------------------------------- Triton
# Two passes, never more than a (BLOCK_M, BLOCK_N) tile of logits:
#
# 1. ``_prefill_lse_kernel``, grid (H, W / BLOCK_M): each query row's base-2 log-sum-exp over its causal keys
#    (online max/sum over key tiles), written to an (H, W) fp32 buffer. Skipped when the caller passes the
#    log-sum-exp that the prompt's flash attention computed anyway (ZeroMergeCache.prefill on CUDA): half the work.
# 2. ``_prefill_colsum_kernel``, grid (Hkv, T / BLOCK_N): a program owns a tile of keys; for every query head of the
#    group and every query tile that can see the keys it sums decay^(T-1-q) * exp2(logit - lse_q) over the queries and
#    writes scores[kv, keys] once (no atomics).
#
# Bytes moved (element size e): pass 1 reads K once per query tile of each head, H*(W/BLOCK_M)*T*D*e (causally about
# half of it), and Q once; pass 2 reads K once and Q once per key tile, (Hkv*T + H*W*(T/BLOCK_N))*D*e; both are
# compute-bound (4*H*W*T*D flops in all). Written: 4*H*W (lse) + 4*Hkv*T (scores).

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _prefill_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    stride_qh, stride_qm, stride_qd,
    stride_kh, stride_kn, stride_kd,
    n_queries, n_keys, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    off_h = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    off_kv = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_queries
    mask_d = offs_d < HEAD_DIM
    q_pos = n_keys - n_queries + offs_m  # absolute positions of the queries
    q = tl.load(q_ptr + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + off_kv * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # keys up to the tile's last query position (key 0 is visible to every query, so m_i is finite after tile 0)
    hi = tl.minimum(n_keys, n_keys - n_queries + start_m + BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < n_keys) & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if IEEE_DOT:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        causal = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < n_keys)
        qk = tl.where(causal, (qk * qk_scale).to(tl.float32), float("-inf"))  # scalars may arrive as fp64
        # online log-sum-exp
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(qk - m_new[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + off_h * n_queries + offs_m, m_i + tl.log2(l_i), mask=mask_m)


def _prefill_colsum_kernel(
    q_ptr, k_ptr, lse_ptr, wt_ptr, out_ptr,
    stride_qh, stride_qm, stride_qd,
    stride_kh, stride_kn, stride_kd,
    n_queries, n_keys, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    off_kv = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_keys
    mask_d = offs_d < HEAD_DIM
    # this program's keys, transposed: (BLOCK_D, BLOCK_N)
    kt = tl.load(k_ptr + off_kv * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=mask_n[None, :] & mask_d[:, None], other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # the first query that sees key start_n sits at index start_n - (T - W); earlier query tiles see none of ours
    first_m = tl.maximum(start_n - (n_keys - n_queries), 0) // BLOCK_M * BLOCK_M
    for g in range(GROUP):
        off_h = off_kv * GROUP + g
        for m0 in range(first_m, n_queries, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < n_queries
            q = tl.load(q_ptr + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            q = q.to(k_ptr.dtype.element_ty)
            if IEEE_DOT:
                qk = tl.dot(q, kt, input_precision="ieee")
            else:
                qk = tl.dot(q, kt)
            lse = tl.load(lse_ptr + off_h * n_queries + offs_m, mask=mask_m, other=0.0)
            wt = tl.load(wt_ptr + offs_m, mask=mask_m, other=0.0)  # decay^(T-1-q)
            # causal probabilities of the tile, weighted by the query's decay, summed over the queries
            q_pos = n_keys - n_queries + offs_m
            keep = (offs_n[None, :] <= q_pos[:, None]) & mask_m[:, None] & mask_n[None, :]
            p = tl.where(keep, tl.exp2((qk * qk_scale).to(tl.float32) - lse[:, None]), 0.0)
            acc += tl.sum(p * wt[:, None], 0)
    tl.store(out_ptr + off_kv * n_keys + offs_n, acc, mask=mask_n)


def _decay_weights(decay: float, n_q: int, device: torch.device) -> Tensor:
    """(W,) fp32 decay^(W-1-q), computed in float64 exactly as the reference does."""
    expo = torch.arange(n_q - 1, -1, -1, device=device, dtype=torch.float64)
    base = torch.full((n_q,), decay, dtype=torch.float64, device=device)  # a fill, not a host copy: graph-safe
    return torch.pow(base, expo).float()


def _prefill_scores_impl(q: Tensor, k: Tensor, lse_in: Optional[Tensor], decay: float,  # noqa: UP045
                         sm_scale: float) -> Tensor:
    n_heads, n_q, d = q.shape
    n_kv, t, _ = k.shape
    g = n_heads // n_kv
    block_d = max(16, next_pow2(d))
    block_m, block_n = (64, 64) if block_d <= 128 else (32, 32)
    ieee = k.dtype == torch.float32
    out = torch.empty((n_kv, t), dtype=torch.float32, device=q.device)
    wts = _decay_weights(decay, n_q, q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(GROUP=g, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE_DOT=ieee,
                num_warps=4, num_stages=2)
    if lse_in is None:
        lse = torch.empty((n_heads, n_q), dtype=torch.float32, device=q.device)
        launch(_prefill_lse_kernel, (n_heads, triton.cdiv(n_q, block_m)),
            q, k, lse, *strides, n_q, t, sm_scale * LOG2E, **meta)
    else:  # natural log -> base 2, contiguous (H, W)
        lse = (lse_in.float() * LOG2E).contiguous()
    launch(_prefill_colsum_kernel, (n_kv, triton.cdiv(t, block_n)),
        q, k, lse, wts, out, *strides, n_q, t, sm_scale * LOG2E, **meta)
    return out


if triton is not None:
    # zmzoo::prefill_scores(Tensor q, Tensor k, Tensor? lse, float decay, float sm_scale) -> Tensor
    _prefill_scores_op = torch.library.triton_op("zmzoo::prefill_scores", _prefill_scores_impl, mutates_args=())


def prefill_scores_triton(q: Tensor, k: Tensor, *, decay: float, sm_scale: float | None = None,
                          lse: Tensor | None = None) -> Tensor:
    """Triton kernels with the semantics of ``prefill_scores_ref`` (registered as zmzoo::prefill_scores)."""
    if triton is None:
        raise RuntimeError("prefill_scores backend='triton' needs the triton package")
    n_heads, n_q, d = q.shape
    if k.shape[2] != d or n_heads % k.shape[0] or n_q > k.shape[1] or n_q < 1:
        raise ValueError(f"prefill_scores: q {tuple(q.shape)} does not match k {tuple(k.shape)}")
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES:
        raise TypeError(f"prefill_scores backend='triton' takes {_DTYPES}, got {q.dtype}/{k.dtype}")
    if lse is not None and tuple(lse.shape) != (n_heads, n_q):
        raise ValueError(f"prefill_scores: lse {tuple(lse.shape)} is not (heads, queries) = {(n_heads, n_q)}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    return torch.ops.zmzoo.prefill_scores(q, k, lse, float(decay), float(sm_scale))
