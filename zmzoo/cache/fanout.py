"""A fan-out cache: several cache configurations of one layer side by side, configuration i in batch row i.

One prompt is prefilled once through the model, and every layer hands the same q/k/v to every configuration's cache,
which scores and compresses it its own way. Decoding then runs every configuration as a row of one batch: row i
through configuration i's cache only, so each row computes what it would compute with that cache alone (zmzoo's batch
rows are independent). ``zmzoo.compare.compare_caches`` builds one per layer; this module is the cache protocol part.

With a ``shadow`` full cache (batch = number of configurations), each row's attention output is also compared with full
attention over the same row's q/k/v history, at every decode step: the error of attending over the compressed cache
alone, not compounded across layers (each row's q/k/v come from its own compressed run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zmzoo.cache.base import KVCache
from zmzoo.cache.full import FullCache


def _shape(c: KVCache) -> tuple:
    return c.n_heads, c.n_kv_heads, c.head_dim, c.dtype, c.sliding_window


class FanoutCache(KVCache):
    """One layer's caches of several configurations (each of batch 1), configuration i in batch row i.

    - ``prefill(q, k, v, row=0)``: the one prompt, into every configuration (and the shadow's every row); returns the
      causal attention output, which is the same for every cache whatever its method (the largest difference seen is
      kept in ``prefill_max_diff``, a float).
    - ``draft_request()`` / ``draft_source`` / ``rescore`` / ``finish_prefill``: row i wants what configuration i
      wants for its row; row i's draft's source and rescore go to configuration i; ``finish_prefill`` to all. (Each
      row drafts its own tokens, through its own configuration, as the rows of one batch.)
    - ``decode(q, k, v, pos)``: q (N, H, 1, D) ... for N configurations; row i through configuration i.

    With ``shadow`` (a ``FullCache`` of batch N and the same shapes), ``decode`` adds each row's relative error
    ``||out_i - full_i|| / ||full_i||`` (over the row's heads) to ``err_sum`` (N,) and counts the steps in
    ``err_count`` (a scalar), fp64 buffers on the caches' device: ``err_sum / err_count`` is the mean error per row.
    """

    method = "fanout"

    def __init__(self, caches: Sequence[KVCache], shadow: FullCache | None = None):
        caches = list(caches)
        if not caches:
            raise ValueError("FanoutCache needs at least one cache")
        c0 = caches[0]
        for i, c in enumerate(caches):
            if c.batch_size != 1:
                raise ValueError(f"FanoutCache: cache #{i} ({c.method}) has batch_size {c.batch_size}; each "
                                 f"configuration is one row (batch_size=1)")
            shape, shape0 = _shape(c), _shape(c0)
            if shape != shape0:
                raise ValueError(f"FanoutCache: cache #{i} has (heads, kv heads, head dim, dtype, window) {shape}, "
                                 f"cache #0 has {shape0}")
        if shadow is not None:
            if not isinstance(shadow, FullCache):
                raise TypeError(f"FanoutCache: the shadow must be a FullCache, not {type(shadow).__name__}")
            if shadow.batch_size != len(caches):
                raise ValueError(f"FanoutCache: the shadow has batch_size {shadow.batch_size} for {len(caches)} "
                                 f"configurations (one row each)")
            if shadow.max_seq_len < max(c.max_seq_len for c in caches):
                raise ValueError(f"FanoutCache: the shadow's max_seq_len {shadow.max_seq_len} is shorter than the "
                                 f"configurations' {max(c.max_seq_len for c in caches)}")
        device = next((b.device for c in caches for b in c.buffers()), torch.device("cpu"))  # where the caches live
        super().__init__(batch_size=len(caches), n_heads=c0.n_heads, n_kv_heads=c0.n_kv_heads, head_dim=c0.head_dim,
                         max_seq_len=min(c.max_seq_len for c in caches), dtype=c0.dtype, device=device,
                         sliding_window=c0.sliding_window, backend=c0.backend)
        self.configs = nn.ModuleList(caches)
        self.shadow = shadow
        self.extra_positions = max(c.extra_positions for c in caches)
        self.register_buffer("err_sum", torch.zeros(len(caches), dtype=torch.float64, device=device),
                             persistent=False)
        self.register_buffer("err_count", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.prefill_max_diff = 0.0

    # ---------------------------------------------------------------- prefill
    def prefill(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        if row != 0:
            raise ValueError(f"FanoutCache takes its one prompt in row 0 (got row {row}): every configuration is "
                             f"prefilled with it")
        outs = [c.prefill(q, k, v, 0) for c in self.configs]
        for o in outs[1:]:
            self.prefill_max_diff = max(self.prefill_max_diff, (o.float() - outs[0].float()).abs().max().item())
        if self.shadow is not None:
            t = k.shape[2]
            self.shadow.prefill(q, k, v, 0)
            self.shadow.k[1:, :, :t] = self.shadow.k[:1, :, :t]
            self.shadow.v[1:, :, :t] = self.shadow.v[:1, :, :t]
        return outs[0]

    def draft_request(self) -> dict[int, tuple[int, int]]:
        """Row i (configuration i) asks for what its configuration asks for its one row."""
        return {i: want[0] for i, c in enumerate(self.configs) if 0 in (want := c.draft_request())}

    def draft_source(self, row: int, spans: Sequence[tuple[int, int]]) -> None:
        self.configs[row].draft_source(0, spans)

    def rescore(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        return self.configs[row].rescore(q, k, v, 0)

    def finish_prefill(self) -> None:
        for c in self.configs:
            c.finish_prefill()

    # ---------------------------------------------------------------- decode
    def decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        outs = [c.decode(q[i : i + 1], k[i : i + 1], v[i : i + 1], pos[i : i + 1]) for i, c in enumerate(self.configs)]
        out = torch.cat(outs, 0)  # (N, H, 1, D)
        if self.shadow is not None:
            ref = self.shadow.decode(q, k, v, pos).float()
            err = (out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
            self.err_sum += err.double()
            self.err_count += 1
        return out

    def reset(self) -> None:
        for c in self.configs:
            c.reset()
        if self.shadow is not None:
            self.shadow.reset()
        self.err_sum.zero_()
        self.err_count.zero_()
        self.prefill_max_diff = 0.0
