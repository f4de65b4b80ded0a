"""The one decoder-only transformer (LLaMA-2, Mistral, Qwen2/2.5, Qwen3, SmolLM2).

The model computes q, k, v and RoPE and hands them to its layer's KV cache, which owns attention (see
``zmzoo/cache/base.py``). It never knows which cache it has. Two entry points:

- ``prefill(tokens, row)``: one prompt (batch 1) written into batch row ``row`` of every cache;
- ``decode(tokens, pos)``: one new token for every batch row at absolute positions ``pos`` (a device tensor);
  static shapes, no host syncs, so ``torch.compile(fullgraph=True)`` and CUDA graphs capture it.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zmzoo.models.config import ModelArgs
from zmzoo.models.quant import QuantEmbedding, QuantLinear, fuse_quant_linears, same_format
from zmzoo.ops.gemv import (
    BACKENDS,
    MAX_ROWS,
    Config,
    Fusion,
    Split,
    Tuned,
    gemv,
    gemv_config,
    rms_norm,
    silu_mul,
    tune,
    tuning_key,
)
from zmzoo.ops.qgemv import qgemv
from zmzoo.ops.qgemv_a8 import check_act_quant, qgemv_a8
from zmzoo.parallel import TensorParallel

Plan = Config | Split | None  # how a decode-step product runs (``zmzoo.ops.gemv``): None is the torch composition


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, kern: PrefillKernels | None = None) -> Tensor:
        return (kern.rms_norm if kern is not None else rms_norm)(x, self.weight, self.eps)


class PrefillKernels:
    """The prompt's elementwise work (RMSNorm, RoPE, SiLU gate), each compiled once for every shape
    (``dynamic=True``): one fused kernel each instead of 2-8 eager ones with fp32 temporaries. Eager, these took a
    quarter of a 40K-token prefill on the H200 (the decode step is compiled whole anyway). A model holds its own
    (``Transformer.set_prefill_kernels``, which ``zmzoo.load`` calls on CUDA with compile on)."""

    def __init__(self, backend: str | Callable = "inductor"):
        def comp(fn):
            return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)

        self.rms_norm, self.rope, self.silu_mul = comp(rms_norm), comp(_rope), comp(silu_mul)


def rope_inv_freq(args: ModelArgs) -> tuple[Tensor, float]:
    """Inverse frequencies (fp32) and the cos/sin attention factor, with ``rope_scaling`` applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = args.rope_scaling
    if not rs:
        return inv_freq, 1.0
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype == "linear":
        return inv_freq / float(rs["factor"]), 1.0
    if rtype == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rtype == "yarn":
        factor = float(rs["factor"])
        old_ctx = float(rs.get("original_max_position_embeddings") or args.max_position_embeddings)
        beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)
        attn_factor = rs.get("attention_factor")
        if attn_factor is None:
            attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def corr_dim(n_rot):
            return (d * math.log(old_ctx / (n_rot * 2 * math.pi))) / (2 * math.log(args.rope_theta))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        inv = (inv_freq / factor) * (1 - extrap) + inv_freq * extrap
        return inv, float(attn_factor)
    raise ValueError(f"rope_scaling type {rtype!r} of model {args.name!r} is not supported (linear, llama3, yarn)")


def rope_tables(args: ModelArgs, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) in fp32, HF ``rotate_half`` layout."""
    inv_freq, attn_factor = rope_inv_freq(args)
    t = torch.arange(max_seq_len, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, d)
    return emb.cos() * attn_factor, emb.sin() * attn_factor


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, chunk: int = 4096, kern: PrefillKernels | None = None) -> Tensor:
    """x: (B, h, T, d); cos/sin: (B, 1, T, d) fp32. Rotation in fp32, result in x's dtype.

    Long prompts are rotated ``chunk`` positions at a time: the fp32 temporaries of a 40K-token prompt at 7B width
    would otherwise be four copies of q in fp32 (2.5 GiB), more than the rest of the layer's activations. ``kern``:
    one compiled kernel, which has no temporaries (see ``PrefillKernels``)."""
    if kern is not None:
        return kern.rope(x, cos, sin)
    t = x.shape[2]
    if t <= chunk:
        return _rope(x, cos, sin)
    out = torch.empty_like(x)
    for a in range(0, t, chunk):
        out[:, :, a : a + chunk] = _rope(x[:, :, a : a + chunk], cos[:, :, a : a + chunk], sin[:, :, a : a + chunk])
    return out


LOOKUP_SPANS = 16  # ranges a prefill draft's lookup reports (``prompt_lookup_spans``'s occurrences)


def prompt_lookup(prompt: Sequence[int], draft: Sequence[int], n: int, min_match: int = 3, skip_end: int = 32,
                  classes: np.ndarray | None = None, max_match: int = 8, restate: int = 4) -> list[int]:
    """``draft`` extended to ``n`` tokens from ``prompt`` (prompt-lookup drafting), or ``draft`` unchanged where
    nothing matches: ``prompt_lookup_spans``'s draft."""
    return prompt_lookup_spans(prompt, draft, n, min_match, skip_end, classes, max_match, restate)[0]


def prompt_lookup_spans(prompt: Sequence[int], draft: Sequence[int], n: int, min_match: int = 3, skip_end: int = 32,
                        classes: np.ndarray | None = None, max_match: int = 8, restate: int = 4,
                        occurrences: int = 1) -> tuple[list[int], list[tuple[int, int]]]:
    """``draft`` extended to ``n`` tokens from ``prompt`` (prompt-lookup drafting), or ``draft`` unchanged where
    nothing matches; and the prompt positions the extension was copied from.

    The prompt's last ``skip_end`` tokens (the *tail*: the question, the chat template, an answer prefix the caller put
    after it) followed by the draft are the *source*; the prompt before the tail is the *body*. Looked for: the longest
    stretch of the draft (at most ``max_match``, at least ``min_match`` tokens; among equals the earliest) that occurs
    in the body followed by at least one body token, at its earliest occurrence there that is not a restatement of the
    tail (the ``restate`` tokens after it occur, in a row, in the tail: the question asked again rather than the fact);
    failing that, the same for the stretches of the source that begin in the tail (an answer prefix the prompt ends
    with, which the draft only continues). Returned: the draft up to the stretch's end (the whole draft when the stretch
    lies in the tail), then what follows the occurrence in the prompt, ``n`` tokens in all; and the *spans*, half-open
    ranges ``(start, end)`` of prompt positions: first the one copied into the draft, then (``occurrences`` > 1) as long
    a range after each later occurrence of the stretch (not a restatement, in position order), up to ``occurrences``
    ranges in all. No match: the draft and no spans.

    ``classes`` (vocabulary-sized ints, ``Tokenizer.word_classes``) compares tokens by class, so a key written
    ``numbers`` in the text and ``number`` in the question, or ``The``/`` the``, still match; None compares ids.

    Every stretch is looked for at every body position at once (numpy: one comparison of the body with each source
    token, carried along as the length of the match ending there), so a 40K-token prompt takes milliseconds."""
    draft = list(draft)
    body = len(prompt) - skip_end
    if body <= min_match:
        return draft, []
    pr = np.asarray(prompt, dtype=np.int64)
    dr = np.asarray(draft, dtype=np.int64)
    if classes is not None:
        pr, dr = classes[pr], classes[dr]
    tail = pr[body:]
    src = np.concatenate([tail, dr])
    p = pr[:body]

    def restated(at: int) -> bool:
        if not restate:
            return False
        nxt = pr[at : at + restate]
        k = len(nxt)
        return any(np.array_equal(tail[j : j + k], nxt) for j in range(len(tail) - k + 1))

    # run[j][i]: how many tokens the source up to j and the body up to i share (their common suffix), so the
    # m-stretch ending at source token j occurs ending at body token i where run[j][i] >= m: one pass over the source
    runs, run = [], np.zeros(body, dtype=np.int32)
    for tok in src:
        nxt = np.ones(body, dtype=np.int32)
        nxt[1:] += run[:-1]
        run = nxt * (p == tok)
        runs.append(run[: body - 1])  # a body token must follow the stretch
    for in_draft in (True, False):  # stretches of the draft alone first, then those of the tail (or across it)
        for m in range(min(len(src), max_match), min_match - 1, -1):
            for end in range(m, len(src) + 1):
                if (end - m >= len(tail)) != in_draft:
                    continue
                conts = []  # the occurrences after which the prompt is not restating its tail, in position order
                for i in np.flatnonzero(runs[end - 1] >= m):
                    if not restated(int(i) + 1):
                        conts.append(int(i) + 1)
                        if len(conts) >= occurrences:
                            break
                if not conts:
                    continue
                head = draft[: end - len(tail)] if end > len(tail) else draft
                out = (head + list(prompt[conts[0] : conts[0] + n - len(head)]))[:n]
                copied = len(out) - len(head)
                spans = [(c, min(c + copied, len(prompt))) for c in conts] if copied > 0 else []
                return out, spans
    return draft, []


@torch.no_grad()
def fuse_linears(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along the output dimension and make each layer's parameters
    views into the result, so no memory is added and names, state dicts and byte counts are unchanged. Call after the
    weights are final: a later ``.to()`` would copy the views apart. Returns (weight, bias or None)."""
    w = torch.cat([m.weight for m in linears], 0)
    b = torch.cat([m.bias for m in linears], 0) if linears[0].bias is not None else None
    o = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w[o : o + n], requires_grad=False)
        if b is not None:
            m.bias = nn.Parameter(b[o : o + n], requires_grad=False)
        o += n
    return w, b


def _distinct_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes the tensors cover, each byte once: views of one storage (fused matrices, ties) by the union of their
    ranges."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for t in tensors:
        a = t.data_ptr()
        ranges.setdefault(t.untyped_storage().data_ptr(), []).append((a, a + t.numel() * t.element_size()))
    total = 0
    for spans in ranges.values():
        end = None
        for a, b in sorted(spans):
            if end is None or a >= end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
    return total


def _gemv_kw(plan: Plan) -> dict:
    return {"backend": "torch"} if plan is None else {"backend": "triton", "config": plan}


def weight_of(linear: nn.Module) -> Tensor | QuantLinear:
    """What a decode-step product multiplies by: an nn.Linear's weight, or a QuantLinear itself."""
    return linear if isinstance(linear, QuantLinear) else linear.weight


def product(x: Tensor, w: Tensor | QuantLinear, b: Tensor | None = None, plan: Plan = None, **fusion) -> Tensor:
    """A decode-step product by ``w`` run as ``plan`` says: ``gemv`` for a dense weight, ``qgemv`` for a quantized
    one (the same fusions, launch settings and plans), ``qgemv_a8`` for a quantized one whose activations are
    quantized too (``QuantLinear.act_quant``)."""
    if isinstance(w, QuantLinear):
        return (qgemv_a8 if w.act_quant else qgemv)(x, w, b, **fusion, **_gemv_kw(plan))
    return gemv(x, w, b, **fusion, **_gemv_kw(plan))


def _linear(x: Tensor, w: Tensor | QuantLinear) -> Tensor:
    """The prompt's product by a fused matrix (a buffer, or a QuantLinear that dequantizes just in time)."""
    return w(x) if isinstance(w, QuantLinear) else F.linear(x, w)


def _sharded(tp: TensorParallel | None) -> bool:
    """A tensor-parallel model over more than one rank: products by ``wo`` and ``w2`` are partial sums."""
    return tp is not None and tp.world > 1


def _reduce(tp: TensorParallel | None, y: Tensor) -> Tensor:
    """The sum over the ranks of a partial product (``y`` itself when the model is not sharded)."""
    return tp.all_reduce(y) if _sharded(tp) else y


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.norm_eps)
            self.k_norm = RMSNorm(hd, args.norm_eps)
        self.register_buffer("wqkv", None, persistent=False)  # q|k|v as one matrix once fused (fuse); a QuantLinear
        # submodule in its place when the three are quantized alike
        self.register_buffer("bqkv", None, persistent=False)
        self.kv_cache = None  # a zmzoo.cache.KVCache, set by Transformer.setup_caches
        self.gemv_plan: dict[str, Plan] = {}  # "qkv", "wo" -> how the decode step's product runs (set_gemv)
        self.tp: TensorParallel | None = None  # this rank's heads of a tensor-parallel model (set_tensor_parallel)

    def fuse(self) -> None:
        """One (q|k|v) matrix: a single GEMV reads all three (batch-1 decode is bound by weight reads, and one large
        matrix-vector product runs closer to the copy bandwidth than three small ones plus their launches)."""
        parts = [self.wq, self.wk, self.wv]
        if all(isinstance(m, nn.Linear) for m in parts):
            w, b = fuse_linears(*parts)
            self.register_buffer("wqkv", w, persistent=False)
        elif same_format(parts):
            w, b = fuse_quant_linears(*parts)
            self.wqkv = w  # the submodule replaces the buffer of that name
        else:  # quantized differently (a GGUF file's mix): three products
            return
        self.register_buffer("bqkv", b, persistent=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor, norm: RMSNorm) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of the block input ``x`` (one token a row), ``norm`` (the block's attention norm) applied first:
        inside the fused product's kernel when q|k|v is one matrix."""
        bsz, t, _ = x.shape
        hd = self.args.head_dim
        nq, nkv = self.args.n_heads * hd, self.args.n_kv_heads * hd
        if self.wqkv is not None:
            q, k, v = product(x, self.wqkv, self.bqkv, self.gemv_plan.get("qkv"), norm=norm.weight,
                              eps=norm.eps).split((nq, nkv, nkv), dim=-1)
        else:
            x = norm(x)
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, t, self.args.n_heads, hd)
        k = k.view(bsz, t, self.args.n_kv_heads, hd)
        v = v.view(bsz, t, self.args.n_kv_heads, hd)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _qkv_prefill(self, x: Tensor, cos: Tensor, sin: Tensor,
                     kern: PrefillKernels | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt's q, k, v one projection at a time, each rotated as soon as it exists: a prompt's activations
        are large (320 MiB each at 40K tokens and 7B widths), and this keeps three of them alive where the fused
        projection kept its whole output (three) plus the two rotated copies. Prefill is bound by compute, so the
        three products cost what one fused product would."""
        bsz, t, _ = x.shape
        hd = self.args.head_dim
        q = self.wq(x).view(bsz, t, self.args.n_heads, hd)
        if self.args.qk_norm:
            q = self.q_norm(q, kern)
        q = apply_rope(q.transpose(1, 2), cos, sin, kern=kern)
        k = self.wk(x).view(bsz, t, self.args.n_kv_heads, hd)
        if self.args.qk_norm:
            k = self.k_norm(k, kern)
        k = apply_rope(k.transpose(1, 2), cos, sin, kern=kern)
        v = self.wv(x).view(bsz, t, self.args.n_kv_heads, hd).transpose(1, 2)
        return q, k, v

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, row: int, norm: nn.Module | None = None,
                kern: PrefillKernels | None = None) -> Tensor:
        """``norm`` (the block's attention norm) is applied here so that the normalised prompt can be freed as soon
        as q, k, v exist; q, k, v are freed before the output projection. ``kern``: see ``PrefillKernels``."""
        bsz, t, _ = x.shape
        xn = norm(x, kern) if norm is not None else x
        q, k, v = self._qkv_prefill(xn, cos, sin, kern)
        del xn
        y = self.kv_cache.prefill(q, k, v, row)  # (1, H, T, hd)
        del q, k, v
        return _reduce(self.tp, self.wo(y.transpose(1, 2).reshape(bsz, t, -1)))

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, norm: RMSNorm) -> Tensor:
        """The residual stream after attention: x + attention(norm(x)), the add inside the output projection."""
        q, k, v = self._qkv(x, cos, sin, norm)
        y = self.kv_cache.decode(q, k, v, pos)  # (B, H, 1, hd)
        y = y.transpose(1, 2).reshape(x.shape[0], 1, -1)
        if _sharded(self.tp):  # each rank's product is a partial sum: the residual is added once, after the sum
            return x + self.tp.all_reduce(product(y, weight_of(self.wo), None, self.gemv_plan.get("wo")))
        return product(y, weight_of(self.wo), None, self.gemv_plan.get("wo"), residual=x)

    def rescore(self, x: Tensor, cos: Tensor, sin: Tensor, row: int, norm: RMSNorm) -> Tensor:
        """The prefill draft's tokens x (1, N, dim) of ``row`` through this layer's attention (see
        ``Transformer.finish_prefill``): the residual stream after it."""
        q, k, v = self._qkv_prefill(norm(x), cos, sin)
        return self._rescore_residual(x, self.kv_cache.rescore(q, k, v, row))

    def _rescore_residual(self, x: Tensor, y: Tensor) -> Tensor:
        """x + the output projection of the draft's attention output y (1, H, N, hd)."""
        bsz, n, _ = x.shape
        return x + _reduce(self.tp, self.wo(y.transpose(1, 2).reshape(bsz, n, -1)))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gemv_plan: dict[str, Plan] = {}  # "w13", "w2" (see Attention.gemv_plan); prompts always use F.linear
        self.tp: TensorParallel | None = None  # this rank's MLP columns (see Attention.tp)
        self.register_buffer("w13", None, persistent=False)  # gate|up as one matrix once fused (fuse; see wqkv)
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up

    def fuse(self) -> None:
        """One (gate|up) matrix (see ``Attention.fuse``)."""
        if isinstance(self.w1, nn.Linear) and isinstance(self.w3, nn.Linear):
            self.register_buffer("w13", fuse_linears(self.w1, self.w3)[0], persistent=False)
        elif same_format([self.w1, self.w3]):
            self.w13 = fuse_quant_linears(self.w1, self.w3)[0]

    def forward(self, x: Tensor, kern: PrefillKernels | None = None) -> Tensor:
        """The prompt's MLP (of the normalised x)."""
        act = kern.silu_mul if kern is not None else silu_mul
        if self.w13 is not None:
            return _reduce(self.tp, self.w2(act(*_linear(x, self.w13).chunk(2, dim=-1))))
        return _reduce(self.tp, self.w2(act(self.w1(x), self.w3(x))))

    def decode(self, h: Tensor, norm: RMSNorm) -> Tensor:
        """The residual stream after the MLP: h + mlp(norm(h)). With gate|up fused, two products: the norm inside the
        first, SiLU gate and residual add inside the second."""
        if self.w13 is None:
            return h + self(norm(h))
        gate_up = product(h, self.w13, None, self.gemv_plan.get("w13"), norm=norm.weight, eps=norm.eps)
        if _sharded(self.tp):  # a partial sum (see Attention.decode)
            return h + self.tp.all_reduce(product(gate_up, weight_of(self.w2), None, self.gemv_plan.get("w2"),
                                                  silu=True))
        return product(gate_up, weight_of(self.w2), None, self.gemv_plan.get("w2"), silu=True, residual=h)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def _mlp(self, h: Tensor, kern: PrefillKernels | None = None) -> Tensor:
        return h + self.feed_forward(self.ffn_norm(h, kern), kern)

    def prefill(self, x: Tensor, cos: Tensor, sin: Tensor, row: int, mlp_chunk: int = 4096,
                kern: PrefillKernels | None = None) -> Tensor:
        h = x + self.attention.prefill(x, cos, sin, row, norm=self.attention_norm, kern=kern)
        if h.shape[1] <= mlp_chunk:
            return self._mlp(h, kern)
        # long prompts: the MLP's (T, 2 x intermediate) activations in chunks, written into one output, bound
        # prefill's peak memory (GEMMs of 4096 rows still run at full speed)
        out = torch.empty_like(h)
        for a in range(0, h.shape[1], mlp_chunk):
            out[:, a : a + mlp_chunk] = self._mlp(h[:, a : a + mlp_chunk], kern)
        return out

    def decode(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> Tensor:
        h = self.attention.decode(x, cos, sin, pos, self.attention_norm)
        return self.feed_forward.decode(h, self.ffn_norm)

    def rescore(self, x: Tensor, cos: Tensor, sin: Tensor, row: int) -> Tensor:
        return self._mlp(self.attention.rescore(x, cos, sin, row, self.attention_norm))


def rescore_layer(layer: TransformerBlock, x: Tensor, cos: Tensor, sin: Tensor, kbuf: Tensor, vbuf: Tensor, s: Tensor,
                  dst: tuple[Tensor, ...], pin: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """What ``layer.rescore(x, cos, sin, row)`` computes, as a function of tensors and settings only: the draft x
    (1, N, dim) through the layer with its cache's stash handed in (``ZeroMergeCache.rescore_inputs``: kbuf, vbuf,
    the prompt's scores s, the positions to pin or None) and the row's buffers ``dst`` to write the new selection into
    (``row_buffers``). Returns
    the residual stream after the layer and the new scores. The stash's bookkeeping stays outside, so that this can
    be compiled once for every layer (the layer's weights are its inputs) and every prompt length (``RescoreStep``)."""
    att = layer.attention
    q, k, v = att._qkv_prefill(layer.attention_norm(x), cos, sin)
    y, s = att.kv_cache.rescore_tensors(q, k, v, kbuf, vbuf, s, dst, pin)
    return layer._mlp(att._rescore_residual(x, y)), s


class RescoreStep:
    """``rescore_layer`` compiled (``torch.compile(fullgraph=True)``, the backend given, no CUDA graphs): one graph
    for every layer (the layer's parameters and buffers are its inputs), prompt length T and draft length N (both
    marked dynamic). The first call compiles it (in the first prefill whose prompt a lookahead compresses, on a
    Generator that compiles: ``Generator.rescore_step``, which says so); later calls with another layer, T or N reuse
    it. Known exceptions: inductor's C++ code (CPU) compiles a second graph once T + N passes 4096, where it sums fp32
    in chunks for accuracy; a draft of one token (a 0/1 size) and another dtype or set of fused projections compile
    their own, and so does a rescore with a pin vector (``lookahead_pin``, its length T dynamic too) beside one
    without. A piece that does not trace raises (fullgraph) rather than running eagerly."""

    def __init__(self, backend: str | Callable = "inductor"):
        self.fn = torch.compile(rescore_layer, fullgraph=True, backend=backend)

    def __call__(self, layer: TransformerBlock, x: Tensor, cos: Tensor, sin: Tensor, kbuf: Tensor, vbuf: Tensor,
                 s: Tensor, dst: tuple[Tensor, ...], pin: Tensor | None = None) -> tuple[Tensor, Tensor]:
        for tensor, dim in ((x, 1), (cos, 2), (sin, 2), (kbuf, 2), (vbuf, 2), (s, 1), (pin, 0)):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return self.fn(layer, x, cos, sin, kbuf, vbuf, s, dst, pin)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_len = 0
        self.prefill_kernels: PrefillKernels | None = None  # the prompt's elementwise work compiled (see there)
        self.gemv = "torch"  # the decode step's products (set_gemv)
        self.act_quant: str | None = None  # the quantized products' activations (set_act_quant)
        self.gemv_plan: dict[str, Plan] = {}  # "output": the LM head's product (see Attention.gemv_plan)
        self.gemv_tuning: dict[tuple, Tuned] = {}  # what zmzoo.ops.gemv.tune measured on this model's weights
        self.quantization: str | None = None  # what zmzoo.load quantized, in words (None: full precision)
        self.tp: TensorParallel | None = None  # tensor parallelism: this rank's part (set_tensor_parallel)

    def set_tensor_parallel(self, tp: TensorParallel | None) -> None:
        """This model is rank ``tp.rank``'s part of a tensor-parallel model (``zmzoo.parallel``): its layers hold its
        heads and MLP columns (built from ``tp.local_args()``), and the attention output and MLP down products are
        summed over the ranks (one all-reduce each). Set it before ``set_gemv`` (the products it times fuse the
        residual add only when the model is not sharded) and before the decode step is compiled."""
        self.tp = tp
        for layer in self.layers:
            layer.attention.tp = layer.feed_forward.tp = tp

    def set_prefill_kernels(self, kernels: PrefillKernels | None) -> None:
        """Run the prompt's RMSNorm, RoPE and SiLU gate through ``kernels`` (compiled), or eagerly with None."""
        self.prefill_kernels = kernels

    def set_act_quant(self, act_quant: str | None) -> None:
        """None, or "int8": the decode step's products by quantized weights (every ``QuantLinear``: the fused and
        unfused projections, a quantized LM head) quantize their activations to int8 per 32 columns and multiply
        integers (``zmzoo.ops.qgemv_a8``: W8A8 / W4A8); dense products and the prompt's products (more than
        ``MAX_ROWS`` rows) are unchanged. Refused for a model with no quantized layer. Set it before ``set_gemv``
        (the tuning table's keys carry it) and before the decode step is compiled."""
        check_act_quant(act_quant)
        quantized = [m for m in self.modules() if isinstance(m, QuantLinear)]
        if act_quant is not None and not quantized:
            raise ValueError(f"act_quant={act_quant!r} quantizes the activations of quantized weights' products, and "
                             "this model has none: load it with quantize='int8' or 'int4' (or a Q8_0/Q4_0/Q4_1 GGUF "
                             "kept quantized)")
        for w in quantized:
            w.set_act_quant(act_quant)
        self.act_quant = act_quant

    def set_gemv(self, backend: str, rows: tuple[int, ...] = (1,)) -> None:
        """Backend of the decode step's matrix-vector products (q|k|v, output projection, gate|up, down, LM head):
        "torch" (F.linear: cuBLAS on CUDA), "triton" (``zmzoo.ops.gemv``'s kernel) or "auto" (per product whichever
        measured faster). The decode step runs ``rows[0]`` rows (its batch); more than ``MAX_ROWS`` always run
        F.linear. On CUDA, "triton" and "auto" first time the kernel's launch settings and F.linear on this model's
        weights (``zmzoo.ops.gemv.tune``: ~13 s for LLaMA-2-7B on an H200; shapes this model already timed are not
        timed again) and keep the table in ``gemv_tuning``; untimed (CPU, the interpreter), "triton" runs the
        kernel's default setting and "auto" runs F.linear. Set it before the decode step is compiled. Quantized
        products (``QuantLinear``) take ``zmzoo.ops.qgemv``'s kernel, tuned the same way (keys with a ``QFormat``);
        their "torch" is the reference, which dequantizes the matrix at every step."""
        if backend not in BACKENDS:
            raise ValueError(f"gemv backend {backend!r} is not one of {BACKENDS}")
        m = rows[0] if rows else 0
        if backend != "torch" and 0 < m <= MAX_ROWS:
            self.gemv_tuning.update(tune(self.decode_products(), rows=(m,), known=self.gemv_tuning))
        for owner, name, w, fusion in self._products():
            plan = None
            if backend != "torch" and 0 < m <= MAX_ROWS:
                tuned = self.gemv_tuning.get(tuning_key(m, w, fusion))
                plan = tuned.plan(backend) if tuned is not None else (gemv_config(m) if backend == "triton" else None)
            owner.gemv_plan[name] = plan
        self.gemv = backend

    def _products(self) -> list[tuple[nn.Module, str, Tensor, Fusion]]:
        """(module, plan name, weight, fusion) of every product the decode step runs through ``gemv``."""
        out = []
        residual = not _sharded(self.tp)  # sharded, the residual is added after the all-reduce
        for layer in self.layers:
            att, ff = layer.attention, layer.feed_forward
            if att.wqkv is not None:
                out.append((att, "qkv", att.wqkv, Fusion(norm=True)))
            out.append((att, "wo", weight_of(att.wo), Fusion(residual=residual)))
            if ff.w13 is not None:
                out += [(ff, "w13", ff.w13, Fusion(norm=True)),
                        (ff, "w2", weight_of(ff.w2), Fusion(silu=True, residual=residual))]
        return out + [(self, "output", weight_of(self.output), Fusion(norm=True))]

    def decode_products(self) -> list[tuple[Tensor, Fusion]]:
        """The matrices the decode step multiplies by through ``gemv``, with what each product fuses (q|k|v and
        gate|up once fused, see ``fuse_projections``; unfused ones go through their nn.Linear)."""
        return [(w, fusion) for _, _, w, fusion in self._products()]

    def tie_weights(self) -> None:
        """Re-tie the output projection to the embedding (after ``load_state_dict(assign=True)``); a quantized
        embedding becomes a QuantLinear over the same tensors."""
        if not self.args.tie_embeddings:
            return
        emb = self.tok_embeddings
        if isinstance(emb, QuantEmbedding):
            if not (isinstance(self.output, QuantLinear) and self.output.q is emb.q):
                self.output = QuantLinear(emb.qtensor, None, emb.dtype)
        else:
            self.output.weight = emb.weight

    def set_quant_backend(self, backend: str) -> None:
        """How the quantized layers dequantize the prompt's matrices: "triton" (the kernel) or "torch"."""
        for m in self.modules():
            if isinstance(m, QuantLinear):
                m.backend = backend

    def weight_nbytes(self) -> dict[str, int]:
        """Bytes of the weights: ``weight_bytes`` held in memory (every parameter and quantized buffer once, views
        and ties counted once) and ``weight_bytes_per_step``, what one decode step reads (the same less an untied
        embedding table, of which a step reads one row)."""
        caches = {id(layer.attention.kv_cache) for layer in self.layers}
        weights, table = [], []
        for mod in self.modules():
            if id(mod) in caches:
                continue
            tensors = list(mod.parameters(recurse=False))
            if isinstance(mod, (QuantLinear, QuantEmbedding)):
                tensors += [t for t in (mod.q, mod.scale, mod.zero) if t is not None]
            weights += tensors
            if mod is self.tok_embeddings and not self.args.tie_embeddings:
                table += tensors
        total = _distinct_bytes(weights)
        emb_bytes = total - _distinct_bytes([t for t in weights if not any(t is e for e in table)])
        return {"weight_bytes": total, "weight_bytes_per_step": total - emb_bytes}

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Fuse q/k/v and gate/up into one matrix each, in place, without extra memory (see ``Attention.fuse``)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()

    def setup_caches(self, caches: list[nn.Module], max_seq_len: int) -> None:
        """Attach one cache module per layer and build RoPE tables for positions < max_seq_len."""
        if len(caches) != len(self.layers):
            raise ValueError(f"setup_caches: got {len(caches)} caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, caches):
            layer.attention.kv_cache = cache
        device = self.norm.weight.device
        # positions past max_seq_len only for a prefill draft (ZeroMerge's lookahead; see zmzoo/cache/base.py)
        extra = max((c.extra_positions for c in caches), default=0)
        cos, sin = rope_tables(self.args, max_seq_len + extra)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.max_seq_len = max_seq_len

    def detach_caches(self) -> None:
        """Let go of the layers' caches (their memory can then be freed)."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    def shared_copy(self) -> Transformer:
        """A second model on the same weights: every parameter and buffer (the fused matrices, the RoPE tables) is
        the same tensor, nothing is copied; it has no caches (``setup_caches``) and its own GEMV plans and
        ``gemv_tuning`` (starting from this model's), so the two can run side by side with different caches."""
        memo: dict[int, object] = {id(t): t for t in itertools.chain(self.parameters(), self.buffers())}
        for cache in self.caches:
            memo[id(cache)] = None
        if self.prefill_kernels is not None:  # compiled pure functions: shared
            memo[id(self.prefill_kernels)] = self.prefill_kernels
        if self.tp is not None:  # the rank's place (its process group) is the same
            memo[id(self.tp)] = self.tp
        return copy.deepcopy(self, memo)

    @property
    def caches(self) -> list[nn.Module]:
        return [layer.attention.kv_cache for layer in self.layers]

    def prefill(self, tokens: Tensor, row: int = 0, all_logits: bool = False) -> Tensor:
        """Run a prompt ``tokens`` (1, T) at positions 0..T-1 into batch row ``row`` of the caches.

        Returns the logits (1, V) of the last position, or (1, T, V) with ``all_logits``.
        """
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"prefill takes one prompt of shape (1, T), got {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.max_seq_len:
            raise ValueError(f"prompt of {t} tokens exceeds max_seq_len {self.max_seq_len}")
        cos = self.rope_cos[:t].view(1, 1, t, -1)
        sin = self.rope_sin[:t].view(1, 1, t, -1)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer.prefill(x, cos, sin, row, kern=self.prefill_kernels)
        x = x if all_logits else x[:, -1:]
        logits = self.output(self.norm(x))
        return logits if all_logits else logits[:, 0]

    @torch.no_grad()
    def finish_prefill(self, first: Tensor, pos: Tensor, decode: Callable[[Tensor, Tensor], Tensor] | None = None,
                       prompts: Sequence[Sequence[int]] | None = None, classes: np.ndarray | None = None,
                       rescore: Callable | None = None) -> None:
        """After every row's prefill: the cache protocol's prefill draft (zmzoo/cache/base.py). Caches that ask for
        it (ZeroMerge's ``lookahead``) get each requesting row's draft run through every layer (``rescore``), which
        they use to compress the row again; then every cache's ``finish_prefill``.

        A row's request is (n, g): n draft tokens, the first g greedy from ``first`` (B,) (each row's prefill argmax)
        at positions ``pos`` (B,) (each row's prompt length), decoded for all rows together by ``decode`` (default:
        ``self.decode``; a Generator passes its compiled step) over the caches as prefill left them. With g < n and
        the row's prompt in ``prompts``, up to n - g more are looked up in the prompt (``prompt_lookup``: after the
        longest stretch of the greedy tokens, or else of the prompt's end, that also occurs earlier in the prompt,
        the prompt's own continuation; tokens compared by ``classes``, a vocabulary-sized array such as
        ``Tokenizer.word_classes``, or by id when None); where nothing matches, the draft is the g greedy tokens. So
        a draft costs g - 1 decode steps whatever it finds. Before a row's draft is rescored, every cache is told
        where in the prompt it was looked up (``draft_source``: the copied range, then up to ``LOOKUP_SPANS`` - 1
        ranges after further occurrences of the matched stretch).
        Every cache's state is restored after the draft's decode steps, so the draft leaves no trace.

        ``rescore``: how each layer rescores (``rescore_layer``'s signature; a Generator that compiles passes its
        ``RescoreStep``); default: eagerly, through the layers' ``rescore``."""
        while True:  # a cache may ask for several rounds, each drafted over the previous round's selection
            requests: dict[int, tuple[int, int]] = {}
            for c in self.caches:
                for row, (n, g) in c.draft_request().items():
                    n0, g0 = requests.get(row, (0, 0))
                    requests[row] = (max(n, n0), max(g, g0))
            if not requests:
                break
            with torch.profiler.record_function("zmzoo.draft"):  # named ranges for profiles (bench/probes)
                drafts, spans = self._draft(first, pos, decode or self.decode, requests, prompts, classes)
            with torch.profiler.record_function("zmzoo.rescore"):
                for row, tokens in sorted(drafts.items()):
                    for c in self.caches:
                        c.draft_source(row, spans.get(row, []))
                    args = (torch.tensor([tokens], device=first.device), row, int(pos[row]))
                    self._rescore(*args) if rescore is None else self._rescore(*args, step=rescore)
        for c in self.caches:
            c.finish_prefill()

    def _draft(self, first: Tensor, pos: Tensor, decode: Callable[[Tensor, Tensor], Tensor],
               requests: dict[int, tuple[int, int]], prompts: Sequence[Sequence[int]] | None,
               classes: np.ndarray | None = None) -> tuple[dict[int, list[int]], dict[int, list[tuple[int, int]]]]:
        """The draft tokens of each requesting row and where in its prompt they were looked up (see
        ``finish_prefill``); the caches are restored afterwards."""
        snaps = [c.snapshot() for c in self.caches]
        tok, p = first.clone(), pos.clone()
        steps = [tok]

        def step() -> None:
            nonlocal tok
            tok = decode(tok, p).argmax(-1)
            p.add_(1)
            steps.append(tok)

        for _ in range(max(g for _, g in requests.values()) - 1):
            step()
        greedy = torch.stack(steps, 1).tolist()  # (B, g) on the host
        drafts, spans = {}, {}
        with torch.profiler.record_function("zmzoo.prompt_lookup"):
            for row, (n, g) in requests.items():
                drafts[row] = greedy[row][:g]
                if g < n and prompts is not None:  # where nothing matches, the greedy tokens alone
                    drafts[row], spans[row] = prompt_lookup_spans(list(prompts[row]), drafts[row], n, classes=classes,
                                                                  occurrences=LOOKUP_SPANS)
        for c, snap in zip(self.caches, snaps):
            c.restore(snap)
        return drafts, spans

    def _rescore(self, tokens: Tensor, row: int, start: int, step: Callable | None = None) -> None:
        """Draft ``tokens`` (1, N) of ``row`` at positions start .. start + N - 1 through every layer's ``rescore``, or
        through ``step`` (``rescore_layer``'s signature) for the layers whose cache splits its rescore so
        (``rescore_tensors``)."""
        n = tokens.shape[1]
        cos = self.rope_cos[start : start + n].view(1, 1, n, -1)
        sin = self.rope_sin[start : start + n].view(1, 1, n, -1)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            cache = layer.attention.kv_cache
            if step is None or not hasattr(cache, "rescore_tensors"):
                x = layer.rescore(x, cos, sin, row)
                continue
            kbuf, vbuf, s, pin = cache.rescore_inputs(row, n)
            x, s = step(layer, x, cos, sin, kbuf, vbuf, s, cache.row_buffers(row), pin)
            cache.rescore_done(row, s)

    def decode(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """One token per batch row: tokens (B,) at absolute positions pos (B,) -> logits (B, V)."""
        bsz = tokens.shape[0]
        cos = self.rope_cos[pos].view(bsz, 1, 1, -1)
        sin = self.rope_sin[pos].view(bsz, 1, 1, -1)
        x = self.tok_embeddings(tokens.view(bsz, 1))
        for layer in self.layers:
            x = layer.decode(x, cos, sin, pos)
        return product(x, weight_of(self.output), None, self.gemv_plan.get("output"), norm=self.norm.weight,
                       eps=self.norm.eps)[:, 0]
