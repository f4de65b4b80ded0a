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

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from zmzoo.cache.base import KVCache
from zmzoo.ops.decode_attention import decode_attention
from zmzoo.ops.prefill_scores import decay_window, pool_scores, prefill_scores
from zmzoo.ops.prompt_attention import prompt_attention
from zmzoo.ops.slot_insert import slot_insert


@torch.library.custom_op("zmzoo::stable_argsort_desc", mutates_args=())
def stable_argsort_desc(x: Tensor) -> Tensor:
    """Positions of x's last dimension by descending value, ties to the earlier position: ``torch.sort``'s stable
    indices, as an op inductor cannot see into. The compiled rescore sorts the prompt's scores through it: inductor's
    own sort lowering guards the sorted length below 32767 (its int16 indices) before it falls back to this same ATen
    sort for a symbolic length, so a prompt past ~32K tokens would compile a second graph."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices


@stable_argsort_desc.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=torch.int64, device=x.device)


def chunk_of_rank(rank: Tensor, n: int, n_chunks: int) -> Tensor:
    """The chunk of item ``rank`` (0-based) of ``n`` ordered items cut into ``n_chunks`` consecutive chunks as equal as
    possible, the first ``n % n_chunks`` one longer."""
    q, r = n // n_chunks, n % n_chunks  # (n may be symbolic: the compiled rescore's prompt length)
    long_span = r * (q + 1)
    return torch.where(rank < long_span, rank // (q + 1), r + (rank - long_span) // torch.sym_max(q, 1))


def chunk_sums(k: Tensor, v: Tensor, scores: Tensor, cid: Tensor, n_chunks: int, score_merge: str,
               block: int | None = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """Per chunk ``c < n_chunks``: sums of the keys and values at the positions with ``cid == c`` and the max (or sum)
    of their scores. k, v (Hkv, T, D), scores and cid (Hkv, T).

    ``block`` positions at a time as a one-hot matrix product, so nothing of the prompt's size is allocated and no
    atomics pile onto one address (a ``scatter_add_`` into the dense slots serialises ~40K additions per slot on a 40K
    prompt). The products are exact: bf16/fp16 keys in fp32 (TF32 holds their mantissa too), fp32 keys in fp64.

    ``block=None``: every position at once as one masked sum over T, no loop (the compiled rescore, whose T is
    symbolic: inductor fuses the mask, the cast and the sum into one reduction, so nothing of the prompt's size is
    allocated there either; eager, it would allocate (Hkv, n_chunks, T, D)). The same sums in the same precision,
    added in another order.
    """
    n_kv, t, d = k.shape
    dev = k.device
    acc = torch.float64 if k.dtype == torch.float32 else torch.float32
    fill = float("-inf") if score_merge == "max" else 0.0
    chunks = torch.arange(n_chunks, device=dev).view(1, n_chunks, 1)
    if block is None:
        onehot = cid.unsqueeze(1) == chunks  # (Hkv, C, T)
        hot = onehot.unsqueeze(-1)
        kd = torch.where(hot, k.unsqueeze(1).to(acc), 0.0).sum(2)
        vd = torch.where(hot, v.unsqueeze(1).to(acc), 0.0).sum(2)
        s = torch.where(onehot, scores.unsqueeze(1), fill)
        return kd, vd, s.amax(-1) if score_merge == "max" else s.sum(-1)
    kd = torch.zeros(n_kv, n_chunks, d, dtype=acc, device=dev)
    vd = torch.zeros_like(kd)
    sd = torch.full((n_kv, n_chunks), fill, dtype=torch.float32, device=dev)
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
        lookahead_rounds: int = 1,
        lookahead_greedy: int = 0,
        lookahead_pin: float = 0.0,
        lookahead_pin_extend: int = 0,
        lookahead_pin_spans: int = 1,
        lookahead_pin_copied: bool = True,
        **kw,
    ):
        super().__init__(**kw)
        self.budget, self.tail, self.dense = budget, tail, dense
        self.ring = self._ring_size()
        self.decay, self.logw_scale = decay, logw_scale
        self.metric, self.score_merge = metric, score_merge
        self.score_window, self.score_pool = score_window, score_pool
        self.lookahead, self.lookahead_prompt_weight = lookahead, lookahead_prompt_weight
        self.lookahead_rounds, self.lookahead_greedy = lookahead_rounds, lookahead_greedy
        # the prompt positions a looked-up draft was copied from (``draft_source``), kept as single slots: at most
        # lookahead_pin of the top slots, each span extended by lookahead_pin_extend positions, lookahead_pin_spans
        # spans (the copied one and further occurrences of its stretch); without lookahead_pin_copied only the
        # extensions (the positions past each span)
        self.lookahead_pin, self.lookahead_pin_extend = lookahead_pin, lookahead_pin_extend
        self.lookahead_pin_spans, self.lookahead_pin_copied = lookahead_pin_spans, lookahead_pin_copied
        self.extra_positions = lookahead  # the draft runs at positions T .. T + lookahead - 1
        self._pending: dict[int, dict] = {}  # row -> its stashed prompt, waiting for the lookahead's rescore
        self._copy_stream = None  # CUDA side stream of the stash's copies to the host
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
        # the dense slots' keys and values in fp32 (merge only): k, v hold their rounded copies, which the attention
        # reads; merging into a bf16 mean would stop moving once its weight passes ~256 (ops/slot_insert.py)
        n_dense = self.dense if self.policy == "merge" else 0
        dshape = (self.batch_size, self.n_kv_heads, n_dense, self.head_dim)
        self.register_buffer("dense_k", torch.zeros(dshape, dtype=torch.float32, device=dev), persistent=False)
        self.register_buffer("dense_v", torch.zeros(dshape, dtype=torch.float32, device=dev), persistent=False)
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
        return self._select(k, v, scores)[:4]

    def _select(self, k: Tensor, v: Tensor, scores: Tensor | None, pin: Tensor | None = None) -> tuple[Tensor, ...]:
        """``select`` plus the dense chunks' mean keys and values in fp32 (Hkv, dense, D) (None without merging).

        ``pin`` (T,) fp32, 1 at positions to keep (at most the top slots' count, ``_pin_vector``), 0 elsewhere: after
        pooling, those positions' scores are raised by each head's highest score plus 1, so every head keeps them
        above any other position, and they keep that lead as decoding decays all scores alike."""
        n_kv, t, d = k.shape
        b, tail, dense = self.budget, self.tail, (self.dense if self.policy == "merge" else 0)
        n_top = b - dense - tail
        scores = pool_scores(scores, self.score_pool)  # SnapKV-style max over neighbours (identity when None)
        if pin is not None:
            scores = scores + pin * (scores.amax(-1, keepdim=True) + 1.0)
        head = scores[:, : t - tail]
        # highest scores, ties to the earlier position (a stable sort; topk's tie order is unspecified)
        order = (stable_argsort_desc(head) if torch.compiler.is_compiling() else
                 torch.sort(head, dim=-1, descending=True, stable=True).indices)
        top = order[:, :n_top].sort(dim=-1).values
        tail_idx = torch.arange(t - tail, t, device=k.device).expand(n_kv, tail)
        keep = torch.cat([top, tail_idx], dim=-1)  # (Hkv, B - dense)
        kk = k.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        vv = v.gather(1, keep.unsqueeze(-1).expand(-1, -1, d))
        ww = torch.ones(n_kv, b - dense, dtype=torch.float32, device=k.device)
        ss = scores.gather(1, keep)
        if dense == 0:
            return kk, vv, ww, ss, None, None
        # the remaining tokens, in sequence order, cut into `dense` consecutive chunks -> one dense slot each
        kept = torch.zeros(n_kv, t, dtype=torch.bool, device=k.device)
        kept.scatter_(1, keep, True)
        n_rest = t - (b - dense)
        free = ~kept
        rank = free.cumsum(1) - 1  # rank of each unkept position among the unkept ones, in sequence order
        cid = torch.where(free, chunk_of_rank(rank, n_rest, dense), dense)  # kept positions: bucket `dense`, dropped
        # chunk sizes: q_len + 1 for the first r_len chunks, q_len after (on the device: no copy from the host, and
        # no Python list of a symbolic length in the compiled rescore)
        q_len, r_len = n_rest // dense, n_rest % dense
        cnt = (torch.arange(dense, device=k.device) < r_len).float() + q_len  # (dense,)
        # compiled (the rescore, T symbolic), the chunk sums as one reduction over T instead of a loop over blocks
        block = None if torch.compiler.is_compiling() else 4096
        kd, vd, sd = chunk_sums(k, v, scores, cid, dense, self.score_merge, block=block)
        kd = (kd / cnt.unsqueeze(-1)).float()
        vd = (vd / cnt.unsqueeze(-1)).float()
        return (torch.cat([kd.to(k.dtype), kk], 1), torch.cat([vd.to(v.dtype), vv], 1),
                torch.cat([cnt.expand(n_kv, dense), ww], 1), torch.cat([sd, ss], 1), kd, vd)

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
        self.dense_k[row].zero_()
        self.dense_v[row].zero_()
        self.base[row] = max(t, self.budget)
        if t <= self.budget:
            self.k[row, :, :t] = k[0]
            self.v[row, :, :t] = v[0]
            self.w[row, :, :t] = 1.0
            n = min(t, self.dense_k.shape[2])  # the first slots are the dense region once decoding fills the cache
            self.dense_k[row, :, :n] = k[0, :, :n].float()
            self.dense_v[row, :, :n] = v[0, :, :n].float()
            if scores is not None:
                self.s[row, :, :t] = scores
        else:
            self._write_selection(row, k[0], v[0], scores)
        if self.lookahead and t > self.budget:  # a prompt that fits is not compressed: nothing to score again
            self._stash_prompt(row, k, v, scores)
        return out

    def _write_selection(self, row: int, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        self._write_into(self.row_buffers(row), k, v, scores)

    def row_buffers(self, row: int) -> tuple[Tensor, ...]:
        """Row ``row`` of the buffers a selection writes: k, v (Hkv, B, D), w, s (Hkv, B), dense_k, dense_v."""
        return self.k[row], self.v[row], self.w[row], self.s[row], self.dense_k[row], self.dense_v[row]

    def _write_into(self, dst: tuple[Tensor, ...], k: Tensor, v: Tensor, scores: Tensor | None,
                    pin: Tensor | None = None) -> None:
        """The selection of k, v (Hkv, T, D) by ``scores`` (and ``pin``, see ``_select``) written into ``dst``
        (``row_buffers``)."""
        kc, vc, wc, sc, kd, vd = self._select(k, v, scores, pin)
        dk, dv, dw, ds, ddk, ddv = dst
        dk.copy_(kc)
        dv.copy_(vc)
        dw.copy_(wc)
        ds.copy_(sc)
        if kd is not None:
            ddk.copy_(kd)
            ddv.copy_(vd)

    # ------------------------------------------------------- lookahead (prefill only)
    # With ``lookahead = N`` the prompt is compressed twice. The first pass is plain ZeroMerge, layer by layer, and
    # each layer also stashes the prompt's keys and values (on the host when they would not fit the device's memory
    # headroom, see ``_stash_on_host``). The model then drafts N greedy tokens through the compressed caches with the
    # ordinary decode step, and runs those tokens again through every layer (``Transformer.finish_prefill``):
    # ``rescore`` gives each layer the draft's q/k/v, attends them over the whole stashed prompt, folds their
    # attention into the prompt's scores as N decode steps would, and selects the row's cache again from the stashed
    # prompt with those scores. The draft is discarded; decoding starts at the prompt's end.

    def _stash_on_host(self, t: int, device: torch.device) -> bool:
        """Whether a prompt of t tokens is stashed on the host: on CUDA when the stash of every layer would exceed the
        cache itself twice over (a 40K prompt with 2048 slots: 20x), so prefill's peak stays plain ZeroMerge's."""
        return device.type == "cuda" and t > 2 * self.budget

    def _stash_len(self, t: int) -> int:
        """Positions of a stash's key and value buffers for a prompt of t tokens: the prompt, room for the draft, and
        one spare position, so that a draft's slice ``[:t + n]`` is never the whole buffer, whatever n: the compiled
        rescore's graph would otherwise hold for the longest draft only, and compile again for shorter ones (or the
        other way round)."""
        return t + self.lookahead + 1

    def _stash_prompt(self, row: int, k: Tensor, v: Tensor, scores: Tensor | None) -> None:
        """Keep the prompt's k, v (1, Hkv, T, D) with room for the draft after it, and its scores."""
        t = k.shape[2]
        if scores is None:
            scores = torch.zeros(self.n_kv_heads, t, dtype=torch.float32, device=k.device)
        w = self.lookahead_prompt_weight
        stash = {"t": t, "s": scores if w == 1.0 else scores * w, "rounds": self.lookahead_rounds}
        if self._stash_on_host(t, k.device):
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(k.device)
            side = self._copy_stream
            side.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(side):
                for name, x in (("k", k), ("v", v)):
                    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                    host.copy_(x, non_blocking=True)
                    x.record_stream(side)  # the caching allocator keeps x until the copy is done
                    stash[name] = host
            stash["ready"] = torch.cuda.Event()
            stash["ready"].record(side)
        else:
            for name, x in (("k", k), ("v", v)):
                buf = x.new_empty(1, self.n_kv_heads, self._stash_len(t), self.head_dim)
                buf[:, :, :t] = x
                stash[name] = buf
        self._pending[row] = stash

    def draft_request(self) -> dict[int, tuple[int, int]]:
        """Rows whose prompt is stashed, each with (draft tokens, of which greedy) (see the section comment)."""
        return {row: (self.lookahead, self.lookahead_greedy or self.lookahead) for row in self._pending}

    def pin_count(self) -> int:
        """How many prompt positions a draft's source may pin: ``lookahead_pin`` of the top slots, floored."""
        n_top = self.budget - self.tail - (self.dense if self.policy == "merge" else 0)
        return math.floor(self.lookahead_pin * n_top) if self.lookahead_pin else 0

    def pin_positions(self, t: int, spans: Sequence[tuple[int, int]]) -> list[int]:
        """The positions of a prompt of t tokens that ``spans`` pin: the first ``lookahead_pin_spans`` spans, each
        extended by ``lookahead_pin_extend`` positions (without ``lookahead_pin_copied``: those positions alone, not
        the span's own) and clipped to the positions before the tail (which is kept anyway), taken a position of
        every span at a time (each span's first, then each one's second, ...) until ``pin_count`` positions are taken,
        so that several spans share the count and none is left out."""
        cap, end = self.pin_count(), t - self.tail
        ranges = [range(max(a if self.lookahead_pin_copied else b, 0), min(b + self.lookahead_pin_extend, end))
                  for a, b in list(spans)[: self.lookahead_pin_spans]]
        out: list[int] = []
        seen: set[int] = set()
        for j in range(max((len(r) for r in ranges), default=0)):
            for r in ranges:
                if j < len(r) and r[j] not in seen and len(out) < cap:
                    seen.add(r[j])
                    out.append(r[j])
        return sorted(out)

    def draft_source(self, row: int, spans: Sequence[tuple[int, int]]) -> None:
        """The prompt positions ``row``'s draft was looked up from (``prompt_lookup_spans``): with ``lookahead_pin``,
        the rescore keeps them (``pin_positions``) as single slots in every head."""
        st = self._pending.get(row)
        if st is None or not self.lookahead_pin:
            return
        at = self.pin_positions(st["t"], spans)
        if at:
            pin = torch.zeros(st["t"], dtype=torch.float32, device=st["s"].device)
            pin[torch.tensor(at, dtype=torch.int64)] = 1.0
            st["pin"] = pin

    @torch.no_grad()
    def rescore(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        """Draft tokens at positions T .. T + N - 1 of ``row``: q (1, H, N, D), k/v (1, Hkv, N, D). Returns their
        attention output (1, H, N, D) over the stashed prompt and themselves (causal), and selects the row's cache
        again from the stashed prompt with the scores ``s = decay^N * w * s_prompt + sum_i decay^(N-1-i) * p_i``
        (``w`` = lookahead_prompt_weight, ``p_i`` draft token i's attention over the prompt, summed over its group),
        which is what N decode steps would fold into the prompt's scores (``ops.prefill_scores`` of the N queries as
        the last ones of the sequence).

        Three steps, which the model's compiled rescore (``zmzoo.models.transformer.rescore_layer``) calls apart so
        that the middle one runs inside its graph: ``rescore_inputs`` (the stash's bookkeeping), ``rescore_tensors``
        (a function of tensors and this cache's settings only) and ``rescore_done``."""
        kbuf, vbuf, s, pin = self.rescore_inputs(row, q.shape[2])
        out, s = self.rescore_tensors(q, k, v, kbuf, vbuf, s, self.row_buffers(row), pin)
        self.rescore_done(row, s)
        return out

    def rescore_inputs(self, row: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Row ``row``'s stash for a draft of ``n`` tokens: its keys and values (1, Hkv, T + lookahead + 1, D) on the
        device, the prompt in positions 0 .. T - 1 (brought back from the host if it was stashed there), its
        scores (Hkv, T), and the positions to pin (T,) (``draft_source``: 1 at each; zeros where nothing was looked up;
        None without ``lookahead_pin``). The stash is consumed by its last round."""
        st = self._pending.get(row)
        if st is None:
            raise RuntimeError(f"{self.method} cache: rescore of row {row}, whose prompt is not stashed")
        if n > self.lookahead:
            raise ValueError(f"{self.method} cache: {n} draft tokens, the stash has room for {self.lookahead}")
        st["rounds"] -= 1
        if st["rounds"] == 0:
            del self._pending[row]
        pin = st.pop("pin", None)  # a further round pins what its own draft's lookup gives
        if pin is None and self.lookahead_pin:  # nothing looked up: a pin of zeros, so that one graph serves both
            pin = torch.zeros(st["t"], dtype=torch.float32, device=st["s"].device)
        if "ready" not in st:
            return st["k"], st["v"], st["s"], pin
        # on the host: to the device, after the prefill's copy is done, into a buffer laid out as the device stash
        t = st["t"]
        dev = st["s"].device
        torch.cuda.current_stream(dev).wait_event(st["ready"])
        bufs = []
        for host in (st["k"], st["v"]):
            buf = torch.empty(1, self.n_kv_heads, self._stash_len(t), self.head_dim, dtype=host.dtype, device=dev)
            buf[:, :, :t].copy_(host, non_blocking=True)
            bufs.append(buf)
        return bufs[0], bufs[1], st["s"], pin

    def rescore_tensors(self, q: Tensor, k: Tensor, v: Tensor, kbuf: Tensor, vbuf: Tensor, s: Tensor,
                        dst: tuple[Tensor, ...], pin: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The rescore's computation: the draft's k, v (1, Hkv, N, D) written after the prompt into ``kbuf``, ``vbuf``
        (``rescore_inputs``: T + N <= their length), the draft's attention output over prompt and draft, the prompt's
        scores ``s`` (Hkv, T) with the draft's folded in, and the selection by those scores written into ``dst``
        (``row_buffers``), ``pin`` (T,) (``rescore_inputs``) raising the pinned positions above the rest (``_select``;
        the scores returned, which a further round adds to, are without it). Returns (output (1, H, N, D), the new
        scores). No Python branch on T and no host sync: the model's compiled rescore traces it once for every prompt
        length."""
        t, n = s.shape[1], q.shape[2]
        kk, vv = kbuf[:, :, : t + n], vbuf[:, :, : t + n]
        kk[:, :, t:] = k
        vv[:, :, t:] = v
        seen = torch.ones(n, t + n, dtype=torch.bool, device=q.device).tril(t)  # (N, T + N): query i sees <= T + i
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=seen, scale=self.sm_scale,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        draft = prefill_scores(q[0], kk[0], decay=self.decay, sm_scale=self.sm_scale, backend=self.backend)
        s = self.decay**n * s + draft[:, :t]
        self._write_into(dst, kk[0, :, :t], vv[0, :, :t], s, pin)
        return out, s

    def rescore_done(self, row: int, s: Tensor) -> None:
        """The scores a further round (``lookahead_rounds``) drafts over and adds to."""
        if row in self._pending:
            self._pending[row]["s"] = s

    def finish_prefill(self) -> None:
        """Drop what a prefill stashed and no rescore consumed."""
        self._pending.clear()

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
            self.k, self.v, self.w, self.s, k_new, v_new, s_new, pos, self.base, self.dense_k, self.dense_v,
            dense=self.dense, ring=self.ring, policy=self.policy, metric=self.metric,
            score_merge=self.score_merge, backend=self.backend,
        )
        return out.unsqueeze(2)
