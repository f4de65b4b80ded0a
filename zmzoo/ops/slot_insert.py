"""Insert one decoded token into a fixed-budget slot cache (append, or ring + demote + merge once full).

One call does the whole bookkeeping of one decode step for every (row, KV head), with device-side indices and
masked writes, so a captured graph serves every step. Policies (all share the frame ``[head region | ring]``):

- ``merge`` (ZeroMerge): the ring's oldest token ``n`` leaves the ring; the lowest-scored slot ``i`` in
  ``[dense, S - ring)`` is merged into the dense slot ``j`` chosen by ``metric`` against ``k_i`` (weighted mean of
  key and value, weights add, score max/sum); ``n`` moves into ``i``; the new token takes ``n``'s ring slot.
  The dense slots' keys and values are accumulated in fp32 (``dense_k``, ``dense_v``: (B, Hkv, dense, D)) whatever
  the cache's dtype, and ``k``/``v`` hold their rounded copies, which the attention reads: in bf16 a running mean
  stored in bf16 stops moving once its weight passes ~256 (each merge changes it by less than half an ulp), while the
  fp32 mean keeps moving.
- ``evict`` (H2O): as ``merge`` but ``i`` (searched in ``[0, S - ring)``) is dropped instead of merged.
- ``ring`` (StreamingLLM, SnapKV decode): the new token overwrites the ring's oldest; the head region is fixed.

Row b has seen ``pos[b]`` tokens before the new one. While ``pos < S`` the new token is appended at slot ``pos``.
The ring's oldest sits at slot ``S - ring + (pos - base) mod ring`` (``base = max(prompt length, S)``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None

POLICIES = ("merge", "evict", "ring")
METRICS = ("dot", "l2")
SCORE_MERGES = ("max", "sum")


def _gather_slot(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, Hkv, S, ...) gathered at idx (B, Hkv) -> (B, Hkv, ...)."""
    shape = idx.shape + (1,) + x.shape[3:]
    index = idx.view(idx.shape + (1,) + (1,) * (x.dim() - 3)).expand(shape)
    return x.gather(2, index).squeeze(2)


def _scatter_slot(x: Tensor, idx: Tensor, val: Tensor) -> None:
    """In place x[b, h, idx[b, h]] = val[b, h].

    An index_put_, not a scatter_: inductor cannot reinplace a functionalized scatter_, so each one became a copy of
    the whole buffer plus the scatter (3-4 copies of each of k, v, w, s per layer and step, on the CPU each an
    OpenMP-parallel loop), and the compiled step took twice as long to compile (SmolLM2-135M on 2 CPU cores: 595 s ->
    305 s). An index_put_ is reinplaced into a store of the B*Hkv written slots; only v's first write still copies v,
    because inductor moves the attention's read of v after it. Same values bit for bit."""
    bsz, n_kv = idx.shape
    rows = torch.arange(bsz, device=idx.device).view(bsz, 1)
    heads = torch.arange(n_kv, device=idx.device).view(1, n_kv)
    x[rows, heads, idx] = val.to(x.dtype)


def slot_insert_ref(
    k: Tensor,
    v: Tensor,
    w: Tensor,
    s: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    s_new: Tensor | None,
    pos: Tensor,
    base: Tensor,
    dense_k: Tensor | None = None,
    dense_v: Tensor | None = None,
    *,
    dense: int,
    ring: int,
    policy: str = "merge",
    metric: str = "dot",
    score_merge: str = "max",
) -> None:
    """Plain-torch reference; mutates k, v (B, Hkv, S, D), w, s (B, Hkv, S) fp32, dense_k, dense_v in place.

    Args:
        k_new, v_new: (B, Hkv, D) the new token; s_new: (B, Hkv) its score (None: 0).
        pos: (B,) int, tokens the row has seen before the new one. base: (B,) int, max(prompt length, S).
        dense_k, dense_v: (B, Hkv, dense, D) fp32, the dense slots' keys and values (merge; needed there): read for
            the metric and the merge, written by the merge and by an append into a dense slot; k, v get their
            rounded copies. Unused by the other policies.
        dense: size of the dense region (merge) / unused otherwise; ring: ring size R >= 1.

    Traffic: O(B*Hkv*(S + dense*D)) reads (scores, dense keys) and a few slot writes; no pass over all of K/V.
    """
    bsz, n_kv, s_len, d = k.shape
    dev = k.device
    full = (pos >= s_len).view(bsz, 1).expand(bsz, n_kv)  # (B, Hkv)
    ring_slot = (s_len - ring + torch.remainder(pos - base, ring)).view(bsz, 1).expand(bsz, n_kv)
    app_slot = pos.clamp(max=s_len - 1).view(bsz, 1).expand(bsz, n_kv)
    if s_new is None:
        s_new = torch.zeros(bsz, n_kv, dtype=s.dtype, device=dev)
    one = torch.ones(bsz, n_kv, dtype=w.dtype, device=dev)

    if policy in ("merge", "evict"):
        lo = dense if policy == "merge" else 0
        i = s[:, :, lo : s_len - ring].argmin(-1) + lo  # (B, Hkv) lowest-scored candidate
        n_k, n_v = _gather_slot(k, ring_slot), _gather_slot(v, ring_slot)
        n_w, n_s = _gather_slot(w, ring_slot), _gather_slot(s, ring_slot)
        if policy == "merge":
            if dense_k is None or dense_v is None:
                raise ValueError("slot_insert policy 'merge' needs dense_k and dense_v (the fp32 dense slots)")
            k_i, v_i = _gather_slot(k, i).float(), _gather_slot(v, i).float()
            w_i, s_i = _gather_slot(w, i), _gather_slot(s, i)
            kd = dense_k  # (B, Hkv, dense, D) fp32
            if metric == "dot":
                j = torch.einsum("bhnd,bhd->bhn", kd, k_i).argmax(-1)
            else:
                j = (kd - k_i.unsqueeze(2)).pow(2).sum(-1).argmin(-1)
            k_j, v_j = _gather_slot(dense_k, j), _gather_slot(dense_v, j)
            w_j, s_j = _gather_slot(w, j), _gather_slot(s, j)
            w_m = w_i + w_j
            k_m = (w_i.unsqueeze(-1) * k_i + w_j.unsqueeze(-1) * k_j) / w_m.unsqueeze(-1)
            v_m = (w_i.unsqueeze(-1) * v_i + w_j.unsqueeze(-1) * v_j) / w_m.unsqueeze(-1)
            s_m = torch.maximum(s_i, s_j) if score_merge == "max" else s_i + s_j
            f = full.unsqueeze(-1)
            # demote i into j (rows not yet full write j's own values back): fp32 into the dense slots, its rounded
            # copy into k, v
            k_m, v_m = torch.where(f, k_m, k_j), torch.where(f, v_m, v_j)
            _scatter_slot(dense_k, j, k_m)
            _scatter_slot(dense_v, j, v_m)
            _scatter_slot(k, j, k_m)
            _scatter_slot(v, j, v_m)
            _scatter_slot(w, j, torch.where(full, w_m, w_j))
            _scatter_slot(s, j, torch.where(full, s_m, s_j))
        # the ring's oldest moves into i
        f = full.unsqueeze(-1)
        _scatter_slot(k, i, torch.where(f, n_k, _gather_slot(k, i)))
        _scatter_slot(v, i, torch.where(f, n_v, _gather_slot(v, i)))
        _scatter_slot(w, i, torch.where(full, n_w, _gather_slot(w, i)))
        _scatter_slot(s, i, torch.where(full, n_s, _gather_slot(s, i)))
    elif policy != "ring":
        raise ValueError(f"slot_insert policy {policy!r} is not one of {POLICIES}")
    # the new token: its ring slot once full, else appended
    slot = torch.where(full, ring_slot, app_slot)
    _scatter_slot(k, slot, k_new)
    _scatter_slot(v, slot, v_new)
    _scatter_slot(w, slot, one)
    _scatter_slot(s, slot, s_new)
    if policy == "merge":  # appended into a dense slot (a prompt shorter than the budget): its fp32 copy too
        into = (~full & (app_slot < dense)).unsqueeze(-1)
        at = app_slot.clamp(max=dense - 1)
        _scatter_slot(dense_k, at, torch.where(into, k_new.float(), _gather_slot(dense_k, at)))
        _scatter_slot(dense_v, at, torch.where(into, v_new.float(), _gather_slot(dense_v, at)))


def slot_insert(
    k: Tensor,
    v: Tensor,
    w: Tensor,
    s: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    s_new: Tensor | None,
    pos: Tensor,
    base: Tensor,
    dense_k: Tensor | None = None,
    dense_v: Tensor | None = None,
    *,
    dense: int,
    ring: int,
    policy: str = "merge",
    metric: str = "dot",
    score_merge: str = "max",
    backend: str = "torch",
) -> None:
    """Insert the new token (see module docstring); ``backend`` is "torch" or "triton"."""
    fn = slot_insert_triton if backend == "triton" else slot_insert_ref
    fn(k, v, w, s, k_new, v_new, s_new, pos, base, dense_k, dense_v, dense=dense, ring=ring, policy=policy,
       metric=metric, score_merge=score_merge)


# ----------------------------------------------------------------------------------------------------------- Triton
# One program per (row, KV head) does the whole step. Every value the step needs (the ring's oldest n, the candidate
# i, the dense slot j, their keys, values, weights and scores) is read first; a barrier then separates those reads
# from the writes (to j, i and the new token's slot), so no thread of the program can read a slot another thread has
# already overwritten. Rows not yet full only append: the searches and the demote/merge writes are skipped, which is
# what the reference's write-backs of unchanged values amount to.
#
# Bytes moved per (row, KV head), element size e: scores of the candidate range (4*(S - R) for merge/evict), the dense
# keys (dense*D*e, merge), three slots' keys and values read (6*D*e) and written (6*D*e), plus a few scalars.

POLICY_IDS = {"merge": 0, "evict": 1, "ring": 2}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _slot_insert_kernel(
    k_ptr, v_ptr, w_ptr, s_ptr, k_new_ptr, v_new_ptr, s_new_ptr, pos_ptr, base_ptr, dk_ptr, dv_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_wb, stride_wh, stride_wn,
    stride_sb, stride_sh, stride_sn,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    stride_snb, stride_snh,
    stride_posb, stride_baseb,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_slots, dense, ring,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr,
    POLICY: tl.constexpr, METRIC_L2: tl.constexpr, SCORE_SUM: tl.constexpr, HAS_S_NEW: tl.constexpr,
):
    off_b = tl.program_id(0).to(tl.int64)
    off_kv = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    k_base = k_ptr + off_b * stride_kb + off_kv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_kv * stride_vh
    w_base = w_ptr + off_b * stride_wb + off_kv * stride_wh
    s_base = s_ptr + off_b * stride_sb + off_kv * stride_sh
    dk_base = dk_ptr + off_b * stride_dkb + off_kv * stride_dkh  # the fp32 dense slots (merge), unit stride in D
    dv_base = dv_ptr + off_b * stride_dvb + off_kv * stride_dvh

    # full or append; the ring's oldest slot (pos - base) mod ring, as a non-negative remainder
    pos = tl.load(pos_ptr + off_b * stride_posb)
    base = tl.load(base_ptr + off_b * stride_baseb)
    full = pos >= n_slots
    r = ((pos - base) % ring).to(tl.int32)
    r = tl.where(r < 0, r + ring, r)
    ring_slot = n_slots - ring + r
    app_slot = tl.minimum(pos, n_slots - 1).to(tl.int32)
    slot = tl.where(full, ring_slot, app_slot)

    if POLICY != 2:
        # i: the lowest score in [lo, S - ring), first index among ties (torch.argmin); skipped while appending
        lo = dense if POLICY == 0 else 0
        hi = tl.where(full, n_slots - ring, lo)
        best_s = float("inf")
        i = lo
        for n0 in range(lo, hi, BLOCK_S):
            offs_n = n0 + tl.arange(0, BLOCK_S)
            sc = tl.load(s_base + offs_n * stride_sn, mask=offs_n < hi, other=float("inf"))
            tile_min = tl.min(sc, 0)
            tile_arg = tl.min(tl.where(sc == tile_min, offs_n, n_slots), 0)
            take = tile_min < best_s  # strict: an earlier tile keeps its tie
            i = tl.where(take, tile_arg, i)
            best_s = tl.where(take, tile_min, best_s)
        # the ring's oldest n, and i (all loads happen before any write)
        n_k = tl.load(k_base + ring_slot * stride_kn + offs_d * stride_kd, mask=mask_d)
        n_v = tl.load(v_base + ring_slot * stride_vn + offs_d * stride_vd, mask=mask_d)
        n_w = tl.load(w_base + ring_slot * stride_wn)
        n_s = tl.load(s_base + ring_slot * stride_sn)
        if POLICY == 0:
            k_i = tl.load(k_base + i * stride_kn + offs_d * stride_kd, mask=mask_d, other=0.0).to(tl.float32)
            v_i = tl.load(v_base + i * stride_vn + offs_d * stride_vd, mask=mask_d, other=0.0).to(tl.float32)
            w_i = tl.load(w_base + i * stride_wn)
            s_i = tl.load(s_base + i * stride_sn)
            # j: the dense slot closest to k_i (dot: largest k_j . k_i, l2: smallest |k_j - k_i|^2), first among ties
            hi_j = tl.where(full, dense, 0)
            best_c = float("inf")
            j = 0
            for j0 in range(0, hi_j, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                mask_j = offs_j < hi_j
                kd = tl.load(dk_base + offs_j[:, None] * stride_dkn + offs_d[None, :],
                             mask=mask_j[:, None] & mask_d[None, :], other=0.0)
                if METRIC_L2:
                    diff = kd - k_i[None, :]
                    crit = tl.sum(diff * diff, 1)
                else:
                    crit = -tl.sum(kd * k_i[None, :], 1)  # exact negation keeps ties: argmax == argmin of -dot
                crit = tl.where(mask_j, crit, float("inf"))
                tile_min = tl.min(crit, 0)
                tile_arg = tl.min(tl.where(crit == tile_min, offs_j, n_slots), 0)
                take = tile_min < best_c
                j = tl.where(take, tile_arg, j)
                best_c = tl.where(take, tile_min, best_c)
            # weighted merge of i into j, in fp32, from j's fp32 copy
            k_j = tl.load(dk_base + j * stride_dkn + offs_d, mask=mask_d, other=0.0)
            v_j = tl.load(dv_base + j * stride_dvn + offs_d, mask=mask_d, other=0.0)
            w_j = tl.load(w_base + j * stride_wn)
            s_j = tl.load(s_base + j * stride_sn)
            w_m = w_i + w_j
            k_m = (w_i * k_i + w_j * k_j) / w_m
            v_m = (w_i * v_i + w_j * v_j) / w_m
            if SCORE_SUM:
                s_m = s_i + s_j
            else:
                s_m = tl.maximum(s_i, s_j)
    # the new token
    k_new = tl.load(k_new_ptr + off_b * stride_knb + off_kv * stride_knh + offs_d * stride_knd, mask=mask_d)
    v_new = tl.load(v_new_ptr + off_b * stride_vnb + off_kv * stride_vnh + offs_d * stride_vnd, mask=mask_d)
    if HAS_S_NEW:
        s_new = tl.load(s_new_ptr + off_b * stride_snb + off_kv * stride_snh)
    else:
        s_new = 0.0

    # every read is done: writes from here on
    tl.debug_barrier()
    if POLICY != 2:
        if full:
            if POLICY == 0:
                # demote i into j: the fp32 mean, and its rounded copy that the attention reads
                tl.store(dk_base + j * stride_dkn + offs_d, k_m, mask=mask_d)
                tl.store(dv_base + j * stride_dvn + offs_d, v_m, mask=mask_d)
                tl.store(k_base + j * stride_kn + offs_d * stride_kd, k_m, mask=mask_d)
                tl.store(v_base + j * stride_vn + offs_d * stride_vd, v_m, mask=mask_d)
                tl.store(w_base + j * stride_wn, w_m)
                tl.store(s_base + j * stride_sn, s_m)
            # the ring's oldest moves into i
            tl.store(k_base + i * stride_kn + offs_d * stride_kd, n_k, mask=mask_d)
            tl.store(v_base + i * stride_vn + offs_d * stride_vd, n_v, mask=mask_d)
            tl.store(w_base + i * stride_wn, n_w)
            tl.store(s_base + i * stride_sn, n_s)
    # the new token takes n's ring slot once full, else slot pos
    tl.store(k_base + slot * stride_kn + offs_d * stride_kd, k_new, mask=mask_d)
    tl.store(v_base + slot * stride_vn + offs_d * stride_vd, v_new, mask=mask_d)
    tl.store(w_base + slot * stride_wn, 1.0)
    tl.store(s_base + slot * stride_sn, s_new)
    if POLICY == 0:
        if (not full) and (app_slot < dense):  # appended into a dense slot: its fp32 copy too
            tl.store(dk_base + app_slot * stride_dkn + offs_d, k_new.to(tl.float32), mask=mask_d)
            tl.store(dv_base + app_slot * stride_dvn + offs_d, v_new.to(tl.float32), mask=mask_d)


OptTensor = Optional[Tensor]  # noqa: UP045 (torch.library infers the op schema from these annotations)


def _slot_insert_impl(
    k: Tensor, v: Tensor, w: Tensor, s: Tensor, k_new: Tensor, v_new: Tensor, s_new: OptTensor, pos: Tensor,
    base: Tensor, dense_k: Tensor, dense_v: Tensor, dense: int, ring: int, policy: int, metric_l2: bool,
    score_sum: bool,
) -> None:
    bsz, n_kv, s_len, d = k.shape
    s_new_arg = s_new if s_new is not None else torch.empty(1, dtype=s.dtype, device=s.device)  # never read
    s_new_strides = s_new.stride() if s_new is not None else (0, 0)
    launch(
        _slot_insert_kernel, (bsz, n_kv),
        k, v, w, s, k_new, v_new, s_new_arg, pos, base, dense_k, dense_v,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        w.stride(0), w.stride(1), w.stride(2),
        s.stride(0), s.stride(1), s.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        v_new.stride(0), v_new.stride(1), v_new.stride(2),
        s_new_strides[0], s_new_strides[1],
        pos.stride(0), base.stride(0),
        dense_k.stride(0), dense_k.stride(1), dense_k.stride(2), dense_v.stride(0), dense_v.stride(1),
        dense_v.stride(2),
        s_len, dense, ring,
        HEAD_DIM=d, BLOCK_D=next_pow2(d), BLOCK_S=1024, BLOCK_J=max(2, min(16, next_pow2(dense))),
        POLICY=policy, METRIC_L2=metric_l2, SCORE_SUM=score_sum, HAS_S_NEW=s_new is not None,
        num_warps=4,
    )


if triton is not None:
    # zmzoo::slot_insert(Tensor(a!) k, Tensor(b!) v, Tensor(c!) w, Tensor(d!) s, ..., Tensor(e!) dense_k,
    #                    Tensor(f!) dense_v, ...) -> ()
    _slot_insert_op = torch.library.triton_op("zmzoo::slot_insert", _slot_insert_impl,
                                              mutates_args={"k", "v", "w", "s", "dense_k", "dense_v"})


def slot_insert_triton(
    k: Tensor,
    v: Tensor,
    w: Tensor,
    s: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    s_new: Tensor | None,
    pos: Tensor,
    base: Tensor,
    dense_k: Tensor | None = None,
    dense_v: Tensor | None = None,
    *,
    dense: int,
    ring: int,
    policy: str = "merge",
    metric: str = "dot",
    score_merge: str = "max",
) -> None:
    """Triton kernel with the semantics of ``slot_insert_ref`` (registered as zmzoo::slot_insert)."""
    if triton is None:
        raise RuntimeError("slot_insert backend='triton' needs the triton package")
    if policy not in POLICIES:
        raise ValueError(f"slot_insert policy {policy!r} is not one of {POLICIES}")
    if metric not in METRICS or score_merge not in SCORE_MERGES:
        raise ValueError(f"slot_insert metric {metric!r} / score_merge {score_merge!r} not in {METRICS} / "
                         f"{SCORE_MERGES}")
    if k.dtype not in _DTYPES or v.dtype not in _DTYPES or w.dtype != torch.float32 or s.dtype != torch.float32:
        raise TypeError(f"slot_insert backend='triton' takes k, v in {_DTYPES} and fp32 w, s; got {k.dtype}, "
                        f"{v.dtype}, {w.dtype}, {s.dtype}")
    s_len = k.shape[2]
    lo = dense if policy == "merge" else 0
    if ring < 1 or (policy != "ring" and lo >= s_len - ring) or (policy == "merge" and dense < 1):
        raise ValueError(f"slot_insert: need ring >= 1, dense >= 1 (merge) and an argmin range [{lo}, "
                         f"{s_len - ring}) that is not empty")
    bsz, n_kv, _, d = k.shape
    if policy == "merge":
        for name, t in (("dense_k", dense_k), ("dense_v", dense_v)):
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != (bsz, n_kv, dense, d) or t.stride(-1) != 1:
                raise ValueError(f"slot_insert policy 'merge' needs {name}: fp32 ({bsz}, {n_kv}, {dense}, {d}) with "
                                 f"unit stride along D, got {None if t is None else (t.dtype, tuple(t.shape))}")
    else:  # never read or written by the kernel
        empty = torch.empty(bsz, n_kv, 0, d, dtype=torch.float32, device=k.device)
        dense_k = empty if dense_k is None else dense_k
        dense_v = empty if dense_v is None else dense_v
    torch.ops.zmzoo.slot_insert(k, v, w, s, k_new, v_new, s_new, pos, base, dense_k, dense_v, int(dense), int(ring),
                                POLICY_IDS[policy], metric == "l2", score_merge == "sum")
