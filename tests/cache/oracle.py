"""Slow, plain-Python reference ("oracle") of the ZeroMerge KV cache and three baselines.

Written only from /work/shared/ZEROMERGE.md, independently of zmzoo/cache and zmzoo/ops, so that the
vectorised implementation can be compared against it step by step, slot by slot.

Everything is float64 and done with explicit loops over heads, slots and tokens; the only tensor
operations are dot products and weighted sums of single ``head_dim`` vectors.  It handles one
sequence (no batch) and one layer.

Conventions (choices the document leaves open; see also the test file):

* Layout after a compressing prefill (T > B): ``[dense D | top | last tail tokens]``; top slots in
  ascending original position.  The ring is the last ``R = tail - 1`` slots; the demotion candidates
  are slots ``[D, B - R)`` (top plus "the slot just before the ring").
* Ring pointer: the oldest ring token sits at slot ``ring_start + ptr``; ``ptr`` is 0 when the cache
  becomes full (right after a compressing prefill, after a prefill of exactly B tokens, or when a
  decode append fills the B-th slot) and advances by one (mod ring length) per full decode step.
* argmin / argmax ties: first index.  Prefill top-k ties: the earlier position wins.
* Dense chunks: the T' = T - B + D left-over tokens, in position order, cut into D consecutive
  chunks, the first (T' mod D) one longer.
* Prompt scores (docs/zeromerge.md, section 3): zeromerge and h2o sum the decayed attention of every query
  (all T of them, not the cache's last W), or with ``score_window = N`` the undecayed attention of the last
  min(T, N) queries; snapkv always scores from a window (32 by default). With ``score_pool = P`` the scores
  are max-pooled over P neighbours before a compressing selection (T > B) only: a prompt that fits keeps
  its unpooled scores (snapkv's slots, which the cache leaves at 0 then, get the pooled ones here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Slot", "ZeroMergeOracle", "POLICIES"]

POLICIES = ("zeromerge", "h2o", "streaming", "snapkv")


@dataclass
class Slot:
    """One kept slot of one KV head."""

    key: torch.Tensor  # (head_dim,) float64
    value: torch.Tensor  # (head_dim,) float64
    w: float  # number of original tokens it stands for
    s: float  # score
    tokens: list[int] = field(default_factory=list)  # absolute positions of the tokens merged into it

    def copy(self) -> Slot:
        return Slot(self.key.clone(), self.value.clone(), float(self.w), float(self.s), list(self.tokens))


def _dot(a: torch.Tensor | list[float], b: torch.Tensor | list[float]) -> float:
    total = 0.0
    for x, y in zip(a if isinstance(a, list) else a.tolist(), b if isinstance(b, list) else b.tolist()):
        total += x * y
    return total


def _softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    z = sum(e)
    return [x / z for x in e]


def _weighted_sum(weights: list[float], vectors: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    out = torch.zeros(head_dim, dtype=torch.float64)
    for p, vec in zip(weights, vectors):
        out = out + p * vec
    return out


def _top_positions(scores: list[float], n_candidates: int, k: int) -> list[int]:
    """Positions of the k highest scores among positions [0, n_candidates), ascending position order.

    Ties: the earlier position is preferred.
    """
    order = sorted(range(n_candidates), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def _argmin_first(values: list[float]) -> int:
    best = 0
    for idx in range(1, len(values)):
        if values[idx] < values[best]:
            best = idx
    return best


def _argmax_first(values: list[float]) -> int:
    best = 0
    for idx in range(1, len(values)):
        if values[idx] > values[best]:
            best = idx
    return best


class ZeroMergeOracle:
    """Reference cache for one layer of one sequence.

    ``policy``: ``"zeromerge"`` (default), ``"h2o"``, ``"streaming"`` or ``"snapkv"``.
    ``budget``, ``tail``, ``dense`` are resolved integer counts.
    """

    def __init__(
        self,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        budget: int,
        tail: int,
        dense: int,
        decay: float = 0.98,
        logw_scale: float = 1.0,
        metric: str = "dot",
        score_merge: str = "max",
        policy: str = "zeromerge",
        sinks: int = 4,
        score_window: int | None = None,
        score_pool: int | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        if n_heads % n_kv_heads != 0:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if metric not in ("dot", "l2"):
            raise ValueError(f"unknown metric {metric!r}")
        if score_merge not in ("max", "sum"):
            raise ValueError(f"unknown score_merge {score_merge!r}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.group = n_heads // n_kv_heads
        self.head_dim = head_dim
        self.budget = budget
        self.decay = float(decay)
        self.logw_scale = float(logw_scale)
        self.metric = metric
        self.score_merge = score_merge
        self.policy = policy
        self.scale = 1.0 / math.sqrt(head_dim)
        if policy == "snapkv":  # snapkv always scores from a window, pooled (the cache's defaults)
            score_window = 32 if score_window is None else score_window
            score_pool = 5 if score_pool is None else score_pool
        if (score_window is not None and score_window < 1) or (score_pool is not None and score_pool < 1):
            raise ValueError("score_window and score_pool must be None or >= 1")
        self.score_window = score_window
        self.score_pool = score_pool

        if policy == "zeromerge":
            if tail < 2 or dense < 1 or budget <= tail + dense:
                raise ValueError("zeromerge needs tail >= 2, dense >= 1, budget > tail + dense")
            self.tail, self.dense, self.sinks = tail, dense, 0
            self.ring_len = tail - 1
            self.ring_start = budget - self.ring_len
        elif policy in ("h2o", "snapkv"):
            if tail < 2 or budget <= tail:
                raise ValueError(f"{policy} needs tail >= 2 and budget > tail")
            self.tail, self.dense, self.sinks = tail, 0, 0
            self.ring_len = tail - 1
            self.ring_start = budget - self.ring_len
        else:  # streaming
            if sinks < 0 or budget <= sinks:
                raise ValueError("streaming needs 0 <= sinks < budget")
            self.tail, self.dense, self.sinks = 0, 0, sinks
            self.ring_len = budget - sinks
            self.ring_start = sinks

        self._slots: list[list[Slot]] = [[] for _ in range(n_kv_heads)]
        self._seen = 0
        self._prefilled = False
        self.ptr: int | None = None  # ring pointer; None while the cache is not full
        self.last_raw_scores: list[list[float]] | None = None  # per kv head, per position, before pooling
        self.last_prefill_scores: list[list[float]] | None = None  # the same after pooling (what a selection uses)
        # per kv head, after a decode step that demoted or evicted (zeromerge, h2o once full): the candidate slots,
        # their updated scores, the slot taken (``i``) and, for zeromerge, the dense slots' metric to slot i's key
        # (dot: larger is nearer; l2: smaller) and the dense slot merged into (``j``); [] after any other step
        self.last_choices: list[dict] = []

    # ------------------------------------------------------------------ public API

    def slots(self, kv_head: int) -> list[Slot]:
        """Copies of the current slots of ``kv_head`` in slot order."""
        return [slot.copy() for slot in self._slots[kv_head]]

    def tokens_seen(self) -> int:
        return self._seen

    def is_full(self) -> bool:
        return self.ptr is not None

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._prefilled or self._seen:
            raise RuntimeError("prefill must be the first call")
        q = q.detach().to(torch.float64)
        k = k.detach().to(torch.float64)
        v = v.detach().to(torch.float64)
        n_heads, T, d = q.shape
        if n_heads != self.n_heads or d != self.head_dim or T < 1:
            raise ValueError("bad q shape")
        if tuple(k.shape) != (self.n_kv_heads, T, d) or tuple(v.shape) != (self.n_kv_heads, T, d):
            raise ValueError("bad k/v shape")

        out = torch.zeros(n_heads, T, d, dtype=torch.float64)
        decayed = [[0.0] * T for _ in range(self.n_kv_heads)]  # exact decayed column sums over every query
        windowed = [[0.0] * T for _ in range(self.n_kv_heads)]  # undecayed, last `score_window` queries
        first_window_query = max(0, T - self.score_window) if self.score_window is not None else 0
        ql, kl, vl = q.tolist(), k.tolist(), v.tolist()  # Python lists: T^2 dot products in plain Python
        for h in range(n_heads):
            g = h // self.group
            for i in range(T):
                logits = [_dot(ql[h][i], kl[g][j]) * self.scale for j in range(i + 1)]
                p = _softmax(logits)
                row = [0.0] * d
                for pj, vec in zip(p, vl[g]):
                    for c in range(d):
                        row[c] += pj * vec[c]
                out[h, i] = torch.tensor(row, dtype=torch.float64)
                factor = self.decay ** (T - 1 - i)
                for j in range(i + 1):
                    decayed[g][j] += factor * p[j]
                    if i >= first_window_query:
                        windowed[g][j] += p[j]

        if self.policy == "streaming":
            raw = [[0.0] * T for _ in range(self.n_kv_heads)]
        elif self.score_window is not None:
            raw = windowed
        else:
            raw = decayed
        pooled = [self.pool_scores(raw[g]) for g in range(self.n_kv_heads)]
        self.last_raw_scores = [list(row) for row in raw]
        self.last_prefill_scores = [list(row) for row in pooled]

        B = self.budget
        if T > B:
            self._slots = self.select_prompt(k, v, raw)
        else:
            # a prompt that fits keeps its unpooled scores (snapkv: the pooled ones, which the cache never reads)
            kept = pooled if self.policy == "snapkv" else raw
            self._slots = [[Slot(k[g, j].clone(), v[g, j].clone(), 1.0, kept[g][j], [j]) for j in range(T)]
                           for g in range(self.n_kv_heads)]
        for g in range(self.n_kv_heads):
            assert len(self._slots[g]) == min(T, B)

        self._seen = T
        self._prefilled = True
        if T >= B:
            self.ptr = 0
        return out

    def pool_scores(self, raw: list[float]) -> list[float]:
        """``raw`` max-pooled over ``score_pool`` neighbours (a copy of it without pooling)."""
        return self._max_pool(raw) if self.score_pool is not None and self.score_pool > 1 else list(raw)

    def select_prompt(self, k: torch.Tensor, v: torch.Tensor, raw: list[list[float]],
                      keep: list[list[int]] | None = None) -> list[list[Slot]]:
        """The slots of every KV head after a compressing prefill (T > B) of keys and values k, v (KV, T, d) with the
        unpooled scores ``raw`` (per KV head, per position): pooled, then ``[dense | top | last tail]`` (zeromerge),
        ``[top | last tail]`` (h2o, snapkv) or ``[sinks | last B - sinks]`` (streaming). ``keep`` (per KV head, the
        top positions, ascending) replaces the top-k: a comparison that finds an implementation taking the other side
        of a near-tie there follows it. Changes no state."""
        k = k.detach().to(torch.float64)
        v = v.detach().to(torch.float64)
        T, B = k.shape[1], self.budget
        if T <= B:
            raise ValueError("select_prompt compresses a prompt longer than the budget")
        out = []
        for g in range(self.n_kv_heads):
            scores = self.pool_scores(raw[g])
            plain = [Slot(k[g, j].clone(), v[g, j].clone(), 1.0, scores[j], [j]) for j in range(T)]
            if self.policy == "streaming":
                keep = list(range(self.sinks)) + list(range(T - (B - self.sinks), T))
                out.append([plain[j] for j in keep])
                continue
            tail_pos = list(range(T - self.tail, T))
            n_top = B - self.dense - self.tail
            top_pos = _top_positions(scores, T - self.tail, n_top) if keep is None else list(keep[g])
            assert len(top_pos) == n_top and top_pos == sorted(set(top_pos)) and top_pos[-1] < T - self.tail
            top_set = set(top_pos)
            dense_slots: list[Slot] = []
            if self.policy == "zeromerge":
                rest = [j for j in range(T - self.tail) if j not in top_set]
                dense_slots = self._chunk_into_dense(rest, k[g], v[g], scores)
            out.append(dense_slots + [plain[j] for j in top_pos] + [plain[j] for j in tail_pos])
        return out

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               choose: dict[int, tuple[int, int | None]] | None = None) -> torch.Tensor:
        """One decode step. ``choose`` (kv head -> (i, j)) makes a full zeromerge/h2o step demote slot ``i`` and
        (zeromerge) merge it into dense slot ``j`` (None: the nearest, as usual) instead of the argmin: a comparison
        that finds an implementation taking the other side of a near-tie follows it (after checking, in
        ``last_choices``, that the choice is within its tolerance of the best)."""
        q = q.detach().to(torch.float64)
        k = k.detach().to(torch.float64)
        v = v.detach().to(torch.float64)
        d = self.head_dim
        if tuple(q.shape) != (self.n_heads, d):
            raise ValueError("bad q shape")
        if tuple(k.shape) != (self.n_kv_heads, d) or tuple(v.shape) != (self.n_kv_heads, d):
            raise ValueError("bad k/v shape")
        pos = self._seen
        B = self.budget
        out = torch.zeros(self.n_heads, d, dtype=torch.float64)

        # 1. attention over the kept slots + the new token, with the log(w) compensation
        slot_p = [[0.0] * len(self._slots[g]) for g in range(self.n_kv_heads)]
        new_p = [0.0] * self.n_kv_heads
        for h in range(self.n_heads):
            g = h // self.group
            slots = self._slots[g]
            logits = []
            for slot in slots:
                logits.append(_dot(q[h], slot.key) * self.scale + self.logw_scale * math.log(slot.w))
            logits.append(_dot(q[h], k[g]) * self.scale)  # the new token: w = 1, log 1 = 0
            p = _softmax(logits)
            out[h] = _weighted_sum(p, [slot.value for slot in slots] + [v[g]], d)
            for idx in range(len(slots)):
                slot_p[g][idx] += p[idx]
            new_p[g] += p[-1]

        # 2. score update
        scored = self.policy in ("zeromerge", "h2o")
        if scored:
            for g in range(self.n_kv_heads):
                for idx, slot in enumerate(self._slots[g]):
                    slot.s = self.decay * slot.s + slot_p[g][idx]

        # 3. insertion
        was_full = self.ptr is not None
        choose = choose or {}
        self.last_choices = []
        for g in range(self.n_kv_heads):
            new_slot = Slot(k[g].clone(), v[g].clone(), 1.0, new_p[g] if scored else 0.0, [pos])
            slots = self._slots[g]
            if not was_full:
                slots.append(new_slot)
                continue
            assert len(slots) == B
            n_idx = self.ring_start + self.ptr
            if self.policy in ("zeromerge", "h2o"):
                cand = list(range(self.dense if self.policy == "zeromerge" else 0, self.ring_start))
                cand_s = [slots[c].s for c in cand]
                i, j = choose.get(g, (None, None))
                i = cand[_argmin_first(cand_s)] if i is None else i
                assert i in cand, (g, i)
                choice = {"candidates": cand, "scores": cand_s, "i": i}
                if self.policy == "zeromerge":
                    metric = self._dense_metric(slots, slots[i].key)
                    j = self._pick_dense(slots, slots[i].key) if j is None else j
                    assert 0 <= j < self.dense, (g, j)
                    choice.update(metric=metric, j=j)
                    self._merge_into(slots[j], slots[i])
                # zeromerge: slot i now in dense slot j; h2o: slot i's token is dropped
                slots[i] = slots[n_idx]
                slots[n_idx] = new_slot
                self.last_choices.append(choice)
            else:  # streaming, snapkv: the new token overwrites the ring's oldest
                slots[n_idx] = new_slot
        if was_full:
            self.ptr = (self.ptr + 1) % self.ring_len
        elif len(self._slots[0]) == B:
            self.ptr = 0
        self._seen += 1
        return out

    # ------------------------------------------------------------------ helpers

    def _max_pool(self, raw: list[float]) -> list[float]:
        """torch.max_pool1d(kernel=pool, stride=1, padding=pool//2) with -inf padding; first T outputs."""
        T = len(raw)
        pad = self.score_pool // 2
        pooled = []
        for o in range(T):
            best = -math.inf
            for j in range(o - pad, o - pad + self.score_pool):
                if 0 <= j < T and raw[j] > best:
                    best = raw[j]
            pooled.append(best)
        return pooled

    def _chunk_into_dense(self, rest: list[int], keys: torch.Tensor, values: torch.Tensor,
                          scores: list[float]) -> list[Slot]:
        D = self.dense
        n = len(rest)
        assert n >= D
        base, extra = divmod(n, D)
        out = []
        start = 0
        for c in range(D):
            size = base + (1 if c < extra else 0)
            chunk = rest[start:start + size]
            start += size
            key = torch.zeros(self.head_dim, dtype=torch.float64)
            value = torch.zeros(self.head_dim, dtype=torch.float64)
            for j in chunk:
                key = key + keys[j]
                value = value + values[j]
            chunk_scores = [scores[j] for j in chunk]
            s = max(chunk_scores) if self.score_merge == "max" else sum(chunk_scores)
            out.append(Slot(key / size, value / size, float(size), s, list(chunk)))
        return out

    def _dense_metric(self, slots: list[Slot], key: torch.Tensor) -> list[float]:
        """Per dense slot: k_j . key (dot) or |k_j - key|^2 (l2)."""
        if self.metric == "dot":
            return [_dot(slots[j].key, key) for j in range(self.dense)]
        dists = []
        for j in range(self.dense):
            diff = slots[j].key - key
            dists.append(_dot(diff, diff))
        return dists

    def _pick_dense(self, slots: list[Slot], key: torch.Tensor) -> int:
        metric = self._dense_metric(slots, key)
        return _argmax_first(metric) if self.metric == "dot" else _argmin_first(metric)

    def _merge_into(self, dst: Slot, src: Slot) -> None:
        wi, wj = src.w, dst.w
        dst.key = (wi * src.key + wj * dst.key) / (wi + wj)
        dst.value = (wi * src.value + wj * dst.value) / (wi + wj)
        dst.w = wi + wj
        dst.s = max(src.s, dst.s) if self.score_merge == "max" else src.s + dst.s
        dst.tokens = sorted(dst.tokens + src.tokens)
