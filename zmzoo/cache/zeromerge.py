"""ZeroMerge (arXiv 2503.10714): a fixed budget of slots per layer, row and KV head, merging instead of evicting.

Slot layout per (row, KV head): ``[dense D | top | ring R = tail - 1]``. Every slot holds a key, a value, a weight
``w`` (tokens it stands for) and a score ``s`` (decayed attention it received). ../shared/ZEROMERGE.md states the
method; this module follows it step by step:

- prefill: full causal attention for the outputs; scores = decayed column sums over the last W queries
  (``ops.prefill_scores``); if the prompt exceeds the budget, ``[dense chunks | top-scored | last tail]`` are kept.
- decode: compensated attention over the kept slots plus the new token with scores folded in
  (``ops.decode_attention``), then the insert (``ops.slot_insert``: append, or ring + demote + merge).

The eviction baselines (``zmzoo.cache.eviction``) reuse this frame with another ``policy``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zmzoo.cache.base import KVCache
from zmzoo.ops.decode_attention import decode_attention
from zmzoo.ops.prefill_scores import decay_window, pool_scores, prefill_scores
from zmzoo.ops.prompt_attention import prompt_attention
from zmzoo.ops.slot_insert import slot_insert


def chunk_of_rank(rank: Tensor, n: int, n_chunks: int) -> Tensor:
    """The chunk of item ``rank`` (0-based) of ``n`` ordered items cut into ``n_chunks`` consecutive chunks as equal as
    possible, the first ``n % n_chunks`` one longer."""
    q, r = divmod(n, n_chunks)
    long_span = r * (q + 1)
    return torch.where(rank < long_span, rank // (q + 1), r + (rank - long_span) // max(q, 1))


def chunk_sums(k: Tensor, v: Tensor, scores: Tensor, cid: Tensor, n_chunks: int, score_merge: str,
               block: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Per chunk ``c < n_chunks``: sums of the keys and values at the positions with ``cid == c`` and the max (or sum)
    of their scores. k, v (Hkv, T, D), scores and cid (Hkv, T).

    ``block`` positions at a time as a one-hot matrix product, so nothing of the prompt's size is allocated and no
    atomics pile onto one address (a ``scatter_add_`` into the dense slots serialises ~40K additions per slot on a 40K
    prompt). The products are exact: bf16/fp16 keys in fp32 (TF32 holds their mantissa too), fp32 keys in fp64.
    """
    n_kv, t, d = k.shape
    dev = k.device
    acc = torch.float64 if k.dtype == torch.float32 else torch.float32
    kd = torch.zeros(n_kv, n_chunks, d, dtype=acc, device=dev)
    vd = torch.zeros_like(kd)
    fill = float("-inf") if score_merge == "max" else 0.0
    sd = torch.full((n_kv, n_chunks), fill, dtype=torch.float32, device=dev)
    chunks = torch.arange(n_chunks, device=dev).view(1, n_chunks, 1)
    for a in range(0, t, block):
        onehot = cid[:, a : a + block].unsqueeze(1) == chunks  # (Hkv, C, block)
        oh = onehot.to(acc)
        kd += torch.bmm(oh, k[:, a : a + block].to(acc))
        vd += torch.bmm(oh, v[:, a : a + block].to(acc))
        s = scores[:, a : a + block].unsqueeze(1)
        if score_merge == "max":
            sd = torch.maximum(sd, torch.where(onehot, s, fill).amax(-1))
        else:
            sd = sd + torch.where(onehot, s, 0.0).sum(-1)
    return kd, vd, sd


class ZeroMergeCache(KVCache):
    """Fixed-budget slot cache. ``policy``: "merge" (ZeroMerge), "evict" (H2O), "ring" (StreamingLLM, SnapKV)."""

    method = "zeromerge"
    policy = "merge"
    compensate = True  # add logw_scale * log(w) to the logits
    decode_scores = True  # fold decode attention into the scores

    def __init__(
        self,
        *,
        budget: int,
        tail: int,
        dense: int,
        decay: float = 0.98,
        logw_scale: float = 1.0,
        metric: str = "dot",
        score_merge: str = "max",
        score_window: int | None = None,
        score_pool: int | None = None,
        lookahead: int = 0,
        lookahead_prompt_weight: float = 1.0,
        **kw,
    ):
        super().__init__(**kw)
        self.budget, self.tail, self.dense = budget, tail, dense
        self.ring = self._ring_size()
        self.decay, self.logw_scale = decay, logw_scale
        self.metric, self.score_merge = metric, score_merge
        self.score_window, self.score_pool = score_window, score_pool
        self.lookahead, self.lookahead_prompt_weight = lookahead, lookahead_prompt_weight
        self.extra_positions = lookahead  # the draft runs at positions T .. T + lookahead - 1
        self._pending: dict | None = None  # a prompt waiting for its lookahead draft before compression
        # diagnostics (bench/probes/needle_trace.py): called as prompt_hook(row, k, scores) with the prompt's keys
        # (1, Hkv, T, D) and its scores (Hkv, T) before the selection; what it returns (scores or None for the same)
        # is selected on
        self.prompt_hook: Callable[[int, Tensor, Tensor | None], Tensor | None] | None = None
        dev = kw["device"]
        shape = (self.batch_size, self.n_kv_heads, budget)
        self.register_buffer("k", torch.zeros(shape + (self.head_dim,), dtype=self.dtype, device=dev),
                             persistent=False)
        self.register_buffer("v", torch.zeros(shape + (self.head_dim,), dtype=self.dtype, device=dev),
                             persistent=False)
        self.register_buffer("w", torch.zeros(shape, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("s", torch.zeros(shape, dtype=torch.float32, device=dev), persistent=False)
        # max(prompt length, budget): the ring pointer of row b is (pos - base[b]) mod ring once full
        self.register_buffer("base", torch.full((self.batch_size,), budget, dtype=torch.int64, device=dev),
                             persistent=False)

    def _ring_size(self) -> int:
        return self.tail - 1

    # ---------------------------------------------------------------- prefill
    def prompt_scores(self, q: Tensor, k: Tensor, lse: Tensor | None = None) -> Tensor:
        """(Hkv, T) fp32 scores of the prompt's tokens from q (1, H, T, D), k (1, Hkv, T, D), before pooling;
        ``lse`` (1, H, T): the queries' log-sum-exp from the prompt's attention, when it returned one."""
        t = k.shape[2]
        w = min(t, self.score_window) if self.score_window else decay_window(self.decay, t)
        decay = 1.0 if self.score_window else self.decay
        lse_w = lse[0, :, t - w :] if lse is not None else None
        return prefill_scores(q[0, :, t - w :], k[0], decay=decay, sm_scale=self.sm_scale, lse=lse_w,
                              backend=self.backend)

    def select(self, k: Tensor, v: Tensor, scores: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Compress a prompt longer than the budget: k, v (Hkv, T, D), scores (Hkv, T) ->
        k, v (Hkv, B, D), w, s (Hkv, B) laid out ``[dense chunks | top (ascending position) | last tail]``."""
        n_kv, t, d = k.shape
        b, tail, dense = self.budget, self.tail, (self.dense if self.policy == "merge" else 0)
        n_top = b - dense - tail
        scores = pool_scores(scores, self.score_pool)  # SnapKV-style max over neighbours (identity when None)
        head = scores[:, : t - tail]
        # highest scores, ties to the earlier position (a stable sort; topk's tie order is unspecified)
        top = torch.sort(head, dim=-1, descending=True, stable=True).indices[:, :n_top].sort(dim=-1).values
        tail_idx = torch.arange(t - tail, t, device=k.device).expand(n_kv, tail)
        keep = torch.cat([top, tail_idx], dim=-1)  # (Hkv, B - dense)
        kk = k.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        vv = v.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        ww = torch.ones(n_kv, b - dense, dtype=torch.float32, device=k.device)
        ss = scores.gather(1, keep)
        if dense == 0:
            return kk, vv, ww, ss
        # the remaining tokens, in sequence order, cut into `dense` consecutive chunks -> one dense slot each
        kept = torch.zeros(n_kv, t, dtype=torch.bool, device=k.device)
        kept.scatter_(1, keep, True)
        n_rest = t - (b - dense)
        free = ~kept
        rank = free.cumsum(1) - 1  # rank of each unkept position among the unkept ones, in sequence order
        cid = torch.where(free, chunk_of_rank(rank, n_rest, dense), dense)  # kept positions: bucket `dense`, dropped
        q_len, r_len = divmod(n_rest, dense)
        cnt = torch.tensor([q_len + 1] * r_len + [q_len] * (dense - r_len), dtype=torch.float32, device=k.device)
        cnt = cnt.expand(n_kv, dense)
        kd, vd, sd = chunk_sums(k, v, scores, cid, dense, self.score_merge)
        kd = (kd / cnt.unsqueeze(-1)).to(k.dtype)
        vd = (vd / cnt.unsqueeze(-1)).to(v.dtype)
        return (torch.cat([kd, kk], 1), torch.cat([vd, vv], 1), torch.cat([cnt, ww], 1), torch.cat([sd, ss], 1))

    def _needs_prompt_scores(self, t: int) -> bool:
        return self.decode_scores or t > self.budget

    @torch.no_grad()
    def prefill(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        t = self._check_prefill(q, k, row)
        need_scores = self._needs_prompt_scores(t)
        # the scoring skips its log-sum-exp pass where the attention's kernel hands it over
        out, lse = prompt_attention(q, k, v, sliding_window=self.sliding_window, sm_scale=self.sm_scale,
                                    want_lse=need_scores)
        scores = self.prompt_scores(q, k, lse) if need_scores else None
        if self.prompt_hook is not None:
            hooked = self.prompt_hook(row, k, scores)
            scores = scores if hooked is None else hooked
        self.w[row].zero_()
        self.s[row].zero_()
        self.base[row] = max(t, self.budget)
        if t <= self.budget:
            self.k[row, :, :t] = k[0]
            self.v[row, :, :t] = v[0]
            self.w[row, :, :t] = 1.0
            if scores is not None:
                self.s[row, :, :t] = scores
        elif self.lookahead:
            # keep the whole prompt until the model has drafted `lookahead` tokens (draft / finish_prefill)
            n = self.lookahead
            pk = k.new_zeros(1, self.n_kv_heads, t + n, self.head_dim)
            pv = v.new_zeros(1, self.n_kv_heads, t + n, self.head_dim)
            ps = torch.zeros(1, self.n_kv_heads, t + n, dtype=torch.float32, device=k.device)
            pk[:, :, :t], pv[:, :, :t] = k, v
            ps[:, :, :t] = scores * self.lookahead_prompt_weight
            self._pending = dict(k=pk, v=pv, s=ps, t=t, row=row, steps=0)
        else:
            self._write_selection(row, k[0], v[0], scores)
        return out

    def _write_selection(self, row: int, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        kc, vc, wc, sc = self.select(k, v, scores)
        self.k[row].copy_(kc)
        self.v[row].copy_(vc)
        self.w[row].copy_(wc)
        self.s[row].copy_(sc)

    # ------------------------------------------------------- lookahead (prefill only)
    def draft_steps(self) -> int:
        """Draft tokens this cache wants before it compresses the prompt just prefilled (0: none pending)."""
        return self.lookahead if self._pending is not None else 0

    @torch.no_grad()
    def draft(self, q: Tensor, k: Tensor, v: Tensor, step: int) -> Tensor:
        """Draft token ``step`` (position T + step) of the pending prompt: full attention over the prompt and the
        earlier draft tokens, its probabilities folded into the prompt's scores as a decode step would
        (``s = decay * s + p``). q (1, H, 1, D), k/v (1, Hkv, 1, D) -> (1, H, 1, D)."""
        p = self._pending
        if p is None or step != p["steps"] or step >= self.lookahead:
            raise RuntimeError(f"{self.method} cache: draft step {step} without a pending prompt at that step")
        end = torch.full((1,), p["t"] + step, dtype=torch.int64, device=k.device)
        out, _ = decode_attention(q[:, :, 0], p["k"], p["v"], torch.zeros_like(end), end, k[:, :, 0], v[:, :, 0],
                                  scores=p["s"], decay=self.decay, sm_scale=self.sm_scale, backend=self.backend)
        p["k"][:, :, p["t"] + step] = k[:, :, 0]
        p["v"][:, :, p["t"] + step] = v[:, :, 0]
        p["steps"] = step + 1
        return out.unsqueeze(2)

    @torch.no_grad()
    def finish_prefill(self) -> None:
        """Compress the pending prompt with the scores its draft tokens added (the draft itself is not kept)."""
        p, self._pending = self._pending, None
        if p is not None:
            t = p["t"]
            self._write_selection(p["row"], p["k"][0, :, :t], p["v"][0, :, :t], p["s"][0, :, :t])

    # ---------------------------------------------------------------- decode
    def new_token_score(self, k_new: Tensor, s_new: Tensor | None) -> Tensor | None:
        """The score (B, Hkv) fp32 the new token's slot starts with, from its key k_new (B, Hkv, D) and the attention
        it got (``s_new``, None without decode scores: the insert then writes 0). Default: that attention."""
        return s_new

    def decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        k_new, v_new = k[:, :, 0], v[:, :, 0]
        # slots [0, min(pos, budget)): the kernel clamps pos to the slot count itself (no start/end tensors)
        out, s_new = decode_attention(
            q[:, :, 0], self.k, self.v, None, pos, k_new, v_new,
            w=self.w if self.compensate else None,
            scores=self.s if self.decode_scores else None,
            logw_scale=self.logw_scale, decay=self.decay, sm_scale=self.sm_scale, backend=self.backend,
        )
        s_new = self.new_token_score(k_new, s_new)
        slot_insert(
            self.k, self.v, self.w, self.s, k_new, v_new, s_new, pos, self.base,
            dense=self.dense, ring=self.ring, policy=self.policy, metric=self.metric,
            score_merge=self.score_merge, backend=self.backend,
        )
        return out.unsqueeze(2)
