"""Decode attention over a slot cache: one query token per row, optional log(w) compensation and score folding.

    out[b, h] = sum_j p[b, h, j] v[b, h//G, j] (+ p_new v_new)
    logit[b, h, j] = sm_scale * q[b, h] . k[b, h//G, j] + logw_scale * log(w[b, h//G, j]),  lo[b] <= j < hi[b]
    hi[b] = min(end[b] + end_offset, S),  lo[b] = max(start[b], 0)  (no start: max(end[b] + end_offset - window, 0))
    scores[b, kv, j] = decay * scores[b, kv, j] + sum_{h in group kv} p[b, h, j]   (valid slots only, in place)
    new_score[b, kv] = sum_{h in group kv} p[b, h, new]

Used by every cache: the full cache (no w, no scores, start from the sliding window) and the compressed caches (w,
scores, the new token passed separately because its slot is chosen after attention, end = the position, which the
kernel clamps to the slot count). The full cache's Triton path passes its new token separately too, with
``store_new``: end = the position (its slot, not yet written) and the split kernel writes k_new, v_new into slot end[b]
of K and V, so the append costs no elementwise kernels of its own (its torch path writes first and attends to
end = position + 1). The caches hand over their position tensor itself: the kernels derive the range from it, so a
compiled step has no small kernels computing start/end tensors for every layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None


def slot_range(start: Tensor | None, end: Tensor, end_offset: int = 0, window: int | None = None
               ) -> tuple[Tensor, Tensor]:
    """(start, end) tensors of the valid range, as the kernels derive it (before clamping to [0, S))."""
    end = end + end_offset if end_offset else end
    if start is None:
        start = (end - window).clamp(min=0) if window is not None else torch.zeros_like(end)
    return start, end


def decode_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    start: Tensor | None,
    end: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    w: Tensor | None = None,
    scores: Tensor | None = None,
    *,
    logw_scale: float = 1.0,
    decay: float = 1.0,
    sm_scale: float | None = None,
    end_offset: int = 0,
    window: int | None = None,
    store_new: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Plain-torch reference (fp32 math).

    Args:
        q: (B, H, D) query of the new token. k, v: (B, Hkv, S, D) slot cache. start, end: (B,) int valid slot range
        [start, end + end_offset), clamped to [0, S); start None: end + end_offset - window (window None: 0).
        k_new, v_new: (B, Hkv, D) the new token's key/value, attended in addition to the slots (or None).
        w: (B, Hkv, S) fp32 slot weights (None: all 1). scores: (B, Hkv, S) fp32, updated in place (or None).
        store_new: also write k_new, v_new into k, v at slot end[b] (rows with end[b] outside [0, S) write nothing),
        the full cache's append; needs end_offset 0, so that the slot is not also attended.
    Returns:
        out (B, H, D) in q's dtype; new_score (B, Hkv) fp32 when k_new is given and scores is not None, else None.

    Traffic: reads K and V once (2*B*Hkv*S*D elements), w and scores once, writes scores once.
    """
    bsz, n_heads, d = q.shape
    n_kv, s_len = k.shape[1], k.shape[2]
    g = n_heads // n_kv
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    start, end = slot_range(start, end, end_offset, window)
    qf = q.float().view(bsz, n_kv, g, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", qf, k.float()) * sm_scale  # (B, Hkv, G, S)
    slot = torch.arange(s_len, device=q.device)
    valid = (slot >= start.view(bsz, 1)) & (slot < end.view(bsz, 1))  # (B, S)
    valid4 = valid.view(bsz, 1, 1, s_len)
    if w is not None:
        logw = torch.log(torch.where(valid.view(bsz, 1, s_len), w, torch.ones_like(w)))
        logits = logits + logw_scale * logw.unsqueeze(2)
    logits = logits.masked_fill(~valid4, float("-inf"))
    if k_new is not None:
        logit_new = (qf * k_new.float().view(bsz, n_kv, 1, d)).sum(-1, keepdim=True) * sm_scale  # (B, Hkv, G, 1)
        logits = torch.cat([logits, logit_new], dim=-1)
    p = torch.softmax(logits, dim=-1)
    # slots outside [start, end) are never read, whatever they hold (as in the kernel's masked loads)
    vf = v.float().masked_fill(~valid.view(bsz, 1, s_len, 1), 0.0)
    out = torch.einsum("bhgs,bhsd->bhgd", p[..., :s_len], vf)
    if k_new is not None:
        out = out + p[..., s_len:] * v_new.float().view(bsz, n_kv, 1, d)
    new_score = None
    if scores is not None:
        psum = p[..., :s_len].sum(2)  # (B, Hkv, S)
        scores.copy_(torch.where(valid.view(bsz, 1, s_len), decay * scores + psum, scores))
        if k_new is not None:
            new_score = p[..., s_len].sum(2)  # (B, Hkv)
    if store_new:
        _store_new(k, v, end, k_new, v_new, end_offset)
    return out.view(bsz, n_heads, d).to(q.dtype), new_score


def _check_store_new(k_new: Tensor | None, v_new: Tensor | None, end_offset: int) -> None:
    if k_new is None or v_new is None or end_offset != 0:
        raise ValueError("decode_attention: store_new needs k_new and v_new, and end_offset 0 (the new token's slot "
                         f"end[b] must lie outside the attended range); got end_offset={end_offset}")


def _store_new(k: Tensor, v: Tensor, end: Tensor, k_new: Tensor | None, v_new: Tensor | None, end_offset: int) -> None:
    """``store_new`` of ``decode_attention_ref``: k[b, :, end[b]] = k_new[b] (and v) where 0 <= end[b] < S."""
    _check_store_new(k_new, v_new, end_offset)
    rows = torch.arange(k.shape[0], device=k.device)
    inside = ((end >= 0) & (end < k.shape[2])).view(-1, 1, 1)
    slot = end.clamp(0, k.shape[2] - 1)
    k[rows, :, slot] = torch.where(inside, k_new.to(k.dtype), k[rows, :, slot])
    v[rows, :, slot] = torch.where(inside, v_new.to(v.dtype), v[rows, :, slot])


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    start: Tensor | None,
    end: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    w: Tensor | None = None,
    scores: Tensor | None = None,
    *,
    logw_scale: float = 1.0,
    decay: float = 1.0,
    sm_scale: float | None = None,
    end_offset: int = 0,
    window: int | None = None,
    store_new: bool = False,
    backend: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """Decode attention (see module docstring); ``backend`` is "torch" or "triton"."""
    kw = dict(logw_scale=logw_scale, decay=decay, sm_scale=sm_scale, end_offset=end_offset, window=window,
              store_new=store_new)
    if backend == "triton":
        return decode_attention_triton(q, k, v, start, end, k_new, v_new, w, scores, **kw)
    return decode_attention_ref(q, k, v, start, end, k_new, v_new, w, scores, **kw)


# ----------------------------------------------------------------------------------------------------------- Triton
# Flash-decoding in two launches.
#
# 1. ``_decode_attn_split_kernel``, grid (B, Hkv, n_splits): program (b, kv, split) takes an equal share of the row's
#    valid slot range [start, end) (computed on device, so a partially filled full cache still spreads its work over
#    every split), loads each K/V tile once for all G query heads of the KV group, and keeps an online softmax
#    (base 2). It writes the split's partial (m, l, acc) and, when scores are folded, the raw base-2 logits of its
#    slots; split 0 also writes the new token's own logit.
# 2. ``_decode_attn_reduce_kernel``, grid (B, Hkv, G + score tiles): programs 0..G-1 merge the partials of one query
#    head (plus the new token) into ``out``; the others fold p = exp(logit - m) / l, summed over the group, into a
#    tile of ``scores`` and write ``new_score``.
#
# Bytes moved (Hkv*S slots per row, element size e): K and V once, 2*B*Hkv*S*D*e; w once, 4*B*Hkv*S; scores read and
# written, 8*B*Hkv*S; logits scratch written and read, 8*B*H*S (only with scores); partials 2*4*B*H*n_splits*(D+2);
# q, out, k_new, v_new: O(B*H*D). At D=128 in bf16 everything past K and V is a few percent.
#
# Kernels are plain functions that ``zmzoo.ops._launch`` decorates with ``triton.jit`` on first launch.

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch settings of the split kernel, from a sweep on an H200 (bench/ops.py: bf16, D=128, MHA 32/32 and GQA 32/8,
# S 2048..40960, batch 1 and 8; run before K and V loads were issued together): BLOCK_N=32, 2 warps, 3 stages and
# ~8 programs per SM were the best or within 10 % of it at every size (MHA S=40960: 100 % of the copy bandwidth,
# against 73 % with BLOCK_N=64, 4 warps, 2 stages, 4 programs per SM). A second sweep (2026-11-29, after K and V
# loads were issued together) found one warp best for a lone query head (MHA: the tile is a multiply-and-reduce,
# no tl.dot): batch 1 S=2048 20.2 -> 17.4 us, S=8192 55.0 -> 45.4 us, batch 8 S=8192 330 -> 289 us, S=40960 166 us
# either way; for GQA groups (tl.dot) two warps stayed best (batch 8 S=8192: 81.7 us against 91.0 us with one).
# One launch instead of two (the split that finishes last in its (row, KV head), found by an atomic ticket, merges the
# partials and folds the scores) was measured on the H200 and is slower at every size: MHA batch 1, 2048 slots 20.8 us
# against 16.8 us, 8192 slots 59.5 against 45.4 us (docs/results/attention-one-launch-h200.txt). In a CUDA graph the
# reduce kernel's launch costs less than the serial tail of one program per group doing the reduce.
MAX_SPLITS = 64
WAVES = 8  # target programs per SM
NUM_WARPS, NUM_STAGES = 2, 3  # NUM_WARPS for GQA groups; a lone query head gets NUM_WARPS_MHA
NUM_WARPS_MHA = 1


def _slot_range(start_ptr, end_ptr, off_b, stride_startb, stride_endb, n_slots, end_offset, window,
                HAS_START: tl.constexpr):
    """Row ``off_b``'s valid slots [lo, hi) (see the module docstring), both clamped to [0, n_slots]."""
    end = tl.load(end_ptr + off_b * stride_endb).to(tl.int32) + end_offset
    if HAS_START:
        lo = tl.load(start_ptr + off_b * stride_startb).to(tl.int32)
    else:
        lo = end - window  # no window: the wrapper passes 2**30
    return tl.minimum(tl.maximum(lo, 0), n_slots), tl.minimum(tl.maximum(end, 0), n_slots)


def _decode_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, start_ptr, end_ptr, k_new_ptr, v_new_ptr,
    m_ptr, l_ptr, o_ptr, logit_ptr, logit_new_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wh, stride_wn,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    stride_startb, stride_endb,
    n_slots, n_heads, qk_scale, logw_scale, end_offset, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT_P: tl.constexpr, IEEE_DOT: tl.constexpr,
    HAS_W: tl.constexpr, HAS_NEW: tl.constexpr, STORE_LOGITS: tl.constexpr, STORE_NEW: tl.constexpr,
):
    off_b = tl.program_id(0).to(tl.int64)
    off_kv = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    offs_h = off_kv * GROUP + offs_g  # the group's query heads
    rows = off_b * n_heads + offs_h  # (b, h) row of the scratch buffers

    # q of the whole KV group: (BLOCK_G, BLOCK_D), padded rows and columns are zero
    q = tl.load(q_ptr + off_b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    q_f32 = q.to(tl.float32)
    q_dot = q.to(k_ptr.dtype.element_ty)

    # this split's share of the row's valid range [start, end), rounded to whole tiles
    row_lo, row_hi = _slot_range(start_ptr, end_ptr, off_b, stride_startb, stride_endb, n_slots, end_offset, window,
                                 HAS_START)
    n_valid = tl.maximum(row_hi - row_lo, 0)
    per_split = tl.cdiv(tl.cdiv(n_valid, n_splits), BLOCK_N) * BLOCK_N
    lo = row_lo + split * per_split
    hi = tl.minimum(lo + per_split, row_hi)

    k_base = k_ptr + off_b * stride_kb + off_kv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_kv * stride_vh
    w_base = w_ptr + off_b * stride_wb + off_kv * stride_wh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        mask_nd = mask_n[:, None] & mask_d[None, :]
        # logits of the tile for all group heads: (BLOCK_G, BLOCK_N), base 2
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        # V is issued with K (it does not depend on the logits): twice the bytes in flight per program
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        if HAS_W:
            wt = tl.load(w_base + offs_n * stride_wn, mask=mask_n, other=1.0)
        if USE_DOT:
            if IEEE_DOT:
                qk = tl.dot(q_dot, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q_dot, tl.trans(k))
        else:  # a single query head (BLOCK_G == 1): multiply and reduce over D
            qk = tl.sum(q_f32 * k.to(tl.float32), 1)[None, :]
        qk = (qk * qk_scale).to(tl.float32)  # a scalar argument may arrive as fp64 (inductor)
        # compensation: + logw_scale * log(w), i.e. logw_scale * log2(w) in base 2
        if HAS_W:
            qk = qk + (logw_scale * tl.log2(wt)).to(tl.float32)[None, :]
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        if STORE_LOGITS:
            tl.store(logit_ptr + rows[:, None] * n_slots + offs_n[None, :], qk, mask=mask_g[:, None] & mask_n[None, :])
        # online softmax: the first tile holds slot `lo`, which is valid, so m_i is finite from here on
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DOT:
            if SPLIT_P:  # p = p_hi + p_lo in v's 16-bit type: ~16 mantissa bits of p reach the fp32 accumulator
                p_hi = p.to(v_ptr.dtype.element_ty)
                p_lo = (p - p_hi.to(tl.float32)).to(v_ptr.dtype.element_ty)
                pv = tl.dot(p_lo, v, tl.dot(p_hi, v))
            else:
                pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.sum(tl.sum(p, 0)[:, None] * v.to(tl.float32), 0)[None, :]
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # partials of this split (an empty split leaves m = -inf, l = 0, acc = 0)
    part = rows * n_splits + split
    tl.store(m_ptr + part, m_i, mask=mask_g)
    tl.store(l_ptr + part, l_i, mask=mask_g)
    tl.store(o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])
    # the new token's own logit (no log w term: its weight is 1), once per row
    if HAS_NEW:
        if split == 0:
            kn = tl.load(k_new_ptr + off_b * stride_knb + off_kv * stride_knh + offs_d * stride_knd, mask=mask_d,
                         other=0.0)
            logit_new = (tl.sum(q_f32 * kn.to(tl.float32)[None, :], 1) * qk_scale).to(tl.float32)
            tl.store(logit_new_ptr + rows, logit_new, mask=mask_g)
            if STORE_NEW:
                # the full cache's write of the new token into slot end[b]: outside the attended range [lo, end),
                # so no other program of this launch reads it
                slot = tl.load(end_ptr + off_b * stride_endb).to(tl.int64)
                # (a scalar condition and-ed into a vector mask fails in Triton's interpreter: fold it into the bound)
                mask_new = offs_d < tl.where((slot >= 0) & (slot < n_slots), HEAD_DIM, 0)
                vn = tl.load(v_new_ptr + off_b * stride_vnb + off_kv * stride_vnh + offs_d * stride_vnd, mask=mask_d,
                             other=0.0)
                tl.store(k_base + slot * stride_kn + offs_d * stride_kd, kn.to(k_ptr.dtype.element_ty), mask=mask_new)
                tl.store(v_base + slot * stride_vn + offs_d * stride_vd, vn.to(v_ptr.dtype.element_ty), mask=mask_new)


def _decode_attn_reduce_kernel(
    m_ptr, l_ptr, o_ptr, logit_ptr, logit_new_ptr, v_new_ptr, start_ptr, end_ptr, scores_ptr, out_ptr,
    new_score_ptr,
    stride_vnb, stride_vnh, stride_vnd,
    stride_startb, stride_endb,
    stride_sb, stride_sh, stride_sn,
    stride_ob, stride_oh, stride_od,
    n_slots, n_heads, n_kv_heads, n_splits, decay, end_offset, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_START: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_NEW: tl.constexpr, HAS_SCORES: tl.constexpr,
):
    off_b = tl.program_id(0).to(tl.int64)
    off_kv = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(2)
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    mask_sp = offs_sp < n_splits
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if pid < GROUP:
        # output of query head h: rescale each split's partial to the global max, add the new token, normalise
        h = off_kv * GROUP + pid
        row = off_b * n_heads + h
        m_s = tl.load(m_ptr + row * n_splits + offs_sp, mask=mask_sp, other=float("-inf"))
        l_s = tl.load(l_ptr + row * n_splits + offs_sp, mask=mask_sp, other=0.0)
        o_s = tl.load(o_ptr + (row * n_splits + offs_sp)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=mask_sp[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_SPLITS, BLOCK_D)
        m = tl.max(m_s, 0)
        if HAS_NEW:
            logit_new = tl.load(logit_new_ptr + row)
            m = tl.maximum(m, logit_new)
        alpha = tl.exp2(m_s - m)  # 0 for empty splits
        l_sum = tl.sum(l_s * alpha, 0)
        acc = tl.sum(o_s * alpha[:, None], 0)
        if HAS_NEW:
            p_new = tl.exp2(logit_new - m)
            v_new = tl.load(v_new_ptr + off_b * stride_vnb + off_kv * stride_vnh + offs_d * stride_vnd, mask=mask_d,
                            other=0.0)
            acc += p_new * v_new.to(tl.float32)
            l_sum += p_new
        tl.store(out_ptr + off_b * stride_ob + h * stride_oh + offs_d * stride_od, acc / l_sum, mask=mask_d)
    else:
        if HAS_SCORES:
            # softmax statistics (m, l) of every head of the group
            offs_g = tl.arange(0, BLOCK_G)
            mask_g = offs_g < GROUP
            rows = off_b * n_heads + off_kv * GROUP + offs_g
            mask_gs = mask_g[:, None] & mask_sp[None, :]
            m_gs = tl.load(m_ptr + rows[:, None] * n_splits + offs_sp[None, :], mask=mask_gs, other=float("-inf"))
            l_gs = tl.load(l_ptr + rows[:, None] * n_splits + offs_sp[None, :], mask=mask_gs, other=0.0)
            m_g = tl.max(m_gs, 1)
            if HAS_NEW:
                logit_new_g = tl.load(logit_new_ptr + rows, mask=mask_g, other=0.0)
                m_g = tl.maximum(m_g, logit_new_g)
            l_g = tl.sum(l_gs * tl.exp2(m_gs - m_g[:, None]), 1)
            if HAS_NEW:
                p_new_g = tl.exp2(logit_new_g - m_g)
                l_g += p_new_g
            # p of this tile's valid slots, summed over the group, folded into the decayed scores
            tile = pid - GROUP
            lo, hi = _slot_range(start_ptr, end_ptr, off_b, stride_startb, stride_endb, n_slots, end_offset, window,
                                 HAS_START)
            offs_n = tile * BLOCK_S + tl.arange(0, BLOCK_S)
            valid = (offs_n >= lo) & (offs_n < hi)
            mask = mask_g[:, None] & valid[None, :]
            logit = tl.load(logit_ptr + rows[:, None] * n_slots + offs_n[None, :], mask=mask, other=float("-inf"))
            p = tl.where(mask, tl.exp2(logit - m_g[:, None]) / l_g[:, None], 0.0)
            s_ptrs = scores_ptr + off_b * stride_sb + off_kv * stride_sh + offs_n * stride_sn
            s_old = tl.load(s_ptrs, mask=valid, other=0.0)
            tl.store(s_ptrs, (decay * s_old).to(tl.float32) + tl.sum(p, 0), mask=valid)
            # the new token's score: its p summed over the group
            if HAS_NEW:
                if tile == 0:
                    new_score = tl.sum(tl.where(mask_g, p_new_g / l_g, 0.0), 0)
                    tl.store(new_score_ptr + off_b * n_kv_heads + off_kv, new_score)


def decode_attention_config(
    bsz: int, n_kv: int, s_len: int, head_dim: int, device: torch.device | str = "cuda", *,
    block_n: int | None = None, n_splits: int | None = None,
) -> tuple[int, int]:
    """(BLOCK_N, n_splits) of the split kernel: about WAVES programs per SM, at most MAX_SPLITS and one per tile."""
    if block_n is None:
        block_n = 32 if head_dim <= 128 else 16
    if n_splits is None:
        n_splits = -(-WAVES * sm_count(torch.device(device)) // (bsz * n_kv))
    n_splits = max(1, min(n_splits, MAX_SPLITS, -(-s_len // block_n)))
    return block_n, n_splits


def _decode_attention_launch(
    q: Tensor, k: Tensor, v: Tensor, start: Tensor | None, end: Tensor, k_new: Tensor | None, v_new: Tensor | None,
    w: Tensor | None, scores: Tensor | None, logw_scale: float, decay: float, sm_scale: float, end_offset: int = 0,
    window: int | None = None, store_new: bool = False, *,
    block_n: int | None = None, n_splits: int | None = None, num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
) -> tuple[Tensor, Tensor]:
    """Launch both kernels; returns (out, new_score) with new_score empty when not computed."""
    bsz, n_heads, d = q.shape
    n_kv, s_len = k.shape[1], k.shape[2]
    g = n_heads // n_kv
    dev = q.device
    f32 = torch.float32
    block_n, n_splits = decode_attention_config(bsz, n_kv, s_len, d, dev, block_n=block_n, n_splits=n_splits)
    block_d = max(16, next_pow2(d))
    use_dot = g > 1  # tl.dot needs 16 rows: pad the group to 16; a lone head multiplies and reduces instead
    block_g = max(16, next_pow2(g)) if use_dot else 1
    if num_warps is None:
        num_warps = NUM_WARPS if use_dot else NUM_WARPS_MHA
    has_new, has_w, has_scores = k_new is not None, w is not None, scores is not None

    m_part = torch.empty((bsz, n_heads, n_splits), dtype=f32, device=dev)
    l_part = torch.empty((bsz, n_heads, n_splits), dtype=f32, device=dev)
    o_part = torch.empty((bsz, n_heads, n_splits, d), dtype=f32, device=dev)
    logits = torch.empty((bsz, n_heads, s_len) if has_scores else (1,), dtype=f32, device=dev)
    logit_new = torch.empty((bsz, n_heads) if has_new else (1,), dtype=f32, device=dev)
    out = torch.empty((bsz, n_heads, d), dtype=q.dtype, device=dev)
    new_score = torch.empty((bsz, n_kv) if has_new and has_scores else (0,), dtype=f32, device=dev)
    # absent optional tensors: a one-element stand-in that the kernels never touch (constexpr flags)
    dummy = torch.empty(1, dtype=f32, device=dev)
    w_arg = w if has_w else dummy
    k_new_arg = k_new if has_new else q
    v_new_arg = v_new if has_new else q
    scores_arg = scores if has_scores else dummy
    has_start = start is not None
    start_arg = start if has_start else end
    window_arg = 1 << 30 if window is None or window < 0 else int(window)  # the op passes -1 for no window
    w_strides = w.stride() if has_w else (0, 0, 0)
    s_strides = scores.stride() if has_scores else (0, 0, 0)

    launch(
        _decode_attn_split_kernel, (bsz, n_kv, n_splits),
        q, k, v, w_arg, start_arg, end, k_new_arg, v_new_arg,
        m_part, l_part, o_part, logits, logit_new,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        w_strides[0], w_strides[1], w_strides[2],
        k_new_arg.stride(0), k_new_arg.stride(1), k_new_arg.stride(2),
        v_new_arg.stride(0), v_new_arg.stride(1), v_new_arg.stride(2),
        start_arg.stride(0), end.stride(0),
        s_len, n_heads, sm_scale * LOG2E, logw_scale, end_offset, window_arg,
        GROUP=g, HEAD_DIM=d, HAS_START=has_start, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_DOT=use_dot, SPLIT_P=use_dot and v.dtype in (torch.float16, torch.bfloat16),
        IEEE_DOT=k.dtype == torch.float32,
        HAS_W=has_w, HAS_NEW=has_new, STORE_LOGITS=has_scores, STORE_NEW=store_new,
        num_warps=num_warps, num_stages=num_stages,
    )
    block_gr = max(2, next_pow2(g))
    block_s = max(256, 2048 // block_gr)
    n_tiles = -(-s_len // block_s) if has_scores else 0
    launch(
        _decode_attn_reduce_kernel, (bsz, n_kv, g + n_tiles),
        m_part, l_part, o_part, logits, logit_new, v_new_arg, start_arg, end, scores_arg, out, new_score,
        v_new_arg.stride(0), v_new_arg.stride(1), v_new_arg.stride(2),
        start_arg.stride(0), end.stride(0),
        s_strides[0], s_strides[1], s_strides[2],
        out.stride(0), out.stride(1), out.stride(2),
        s_len, n_heads, n_kv, n_splits, decay, end_offset, window_arg,
        GROUP=g, HEAD_DIM=d, HAS_START=has_start, BLOCK_G=block_gr, BLOCK_D=block_d,
        BLOCK_SPLITS=max(2, next_pow2(n_splits)), BLOCK_S=block_s, HAS_NEW=has_new, HAS_SCORES=has_scores,
        num_warps=4,
    )
    return out, new_score


OptTensor = Optional[Tensor]  # noqa: UP045 (torch.library infers the op schema from these annotations)


def _decode_attention_impl(
    q: Tensor, k: Tensor, v: Tensor, start: OptTensor, end: Tensor, k_new: OptTensor, v_new: OptTensor,
    w: OptTensor, scores: OptTensor, logw_scale: float, decay: float, sm_scale: float, end_offset: int, window: int,
) -> tuple[Tensor, Tensor]:
    return _decode_attention_launch(q, k, v, start, end, k_new, v_new, w, scores, logw_scale, decay, sm_scale,
                                    end_offset, window)


def _decode_attention_store_impl(
    q: Tensor, k: Tensor, v: Tensor, start: OptTensor, end: Tensor, k_new: Tensor, v_new: Tensor,
    w: OptTensor, scores: OptTensor, logw_scale: float, decay: float, sm_scale: float, window: int,
) -> tuple[Tensor, Tensor]:
    return _decode_attention_launch(q, k, v, start, end, k_new, v_new, w, scores, logw_scale, decay, sm_scale,
                                    0, window, store_new=True)


if triton is not None:
    _slot_range = triton.jit(_slot_range)  # called from the kernels (which are jitted on first launch, see _launch)
    # zmzoo::decode_attention(..., Tensor(a!)? scores, ...) -> (Tensor out, Tensor new_score)
    _decode_attention_op = torch.library.triton_op("zmzoo::decode_attention", _decode_attention_impl,
                                                   mutates_args={"scores"})
    # the same with store_new: the split kernel also writes the new token into K and V (one op per mutation set, so
    # the compiled step's mutation bookkeeping stays exact for the call that does not write them)
    _decode_attention_store_op = torch.library.triton_op("zmzoo::decode_attention_store",
                                                         _decode_attention_store_impl,
                                                         mutates_args={"k", "v", "scores"})


def decode_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    start: Tensor | None,
    end: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    w: Tensor | None = None,
    scores: Tensor | None = None,
    *,
    logw_scale: float = 1.0,
    decay: float = 1.0,
    sm_scale: float | None = None,
    end_offset: int = 0,
    window: int | None = None,
    store_new: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Triton flash-decoding with the semantics of ``decode_attention_ref`` (registered as zmzoo::decode_attention;
    with ``store_new`` as zmzoo::decode_attention_store, which also mutates k and v)."""
    if triton is None:
        raise RuntimeError("decode_attention backend='triton' needs the triton package")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    bsz, n_heads, d = q.shape
    if k.shape[0] != bsz or k.shape[3] != d or v.shape != k.shape or n_heads % k.shape[1]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not match k {tuple(k.shape)} / "
                         f"v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype not in _DTYPES or v.dtype not in _DTYPES:
        raise TypeError(f"decode_attention backend='triton' takes {_DTYPES}, got {q.dtype}/{k.dtype}/{v.dtype}")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    if store_new:
        _check_store_new(k_new, v_new, end_offset)
        out, new_score = torch.ops.zmzoo.decode_attention_store(
            q, k, v, start, end, k_new, v_new, w, scores, float(logw_scale), float(decay), float(sm_scale),
            -1 if window is None else int(window)
        )
    else:
        out, new_score = torch.ops.zmzoo.decode_attention(
            q, k, v, start, end, k_new, v_new, w, scores, float(logw_scale), float(decay), float(sm_scale),
            int(end_offset), -1 if window is None else int(window)
        )
    return out, (new_score if k_new is not None and scores is not None else None)
