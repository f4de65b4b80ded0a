"""Generator: tokenize, prefill, the compiled (and on CUDA graph-captured) decode step, sampling, stop, stream, score.

Every batch row is independent: each prompt is prefilled alone into its own cache row, then all rows decode together
with per-row positions held in a device tensor. The decode step has static shapes and takes no host sync, so
``torch.compile(fullgraph=True)`` compiles it once and, on CUDA, "reduce-overhead" replays one CUDA graph per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zmzoo.cache import CacheConfig, full_cache_nbytes
from zmzoo.models.config import ModelArgs
from zmzoo.models.transformer import Transformer

Prompt = str | Sequence[int] | Sequence[dict]


@dataclass
class GenerationStats:
    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.new_tokens, default=0) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (B,) from logits (B, V), on the device (no host sync)."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    # exponential race: argmax(p / E) with E ~ Exp(1) samples from p without a host sync
    e = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / e).argmax(-1)


class Generator:
    """A loaded model with its preallocated caches. Build it with ``zmzoo.load``."""

    def __init__(self, model: Transformer, tokenizer: Any, args: ModelArgs, cache_config: CacheConfig, *,
                 device: torch.device, dtype: torch.dtype, max_seq_len: int, max_batch_size: int,
                 compile: bool | str | Callable = True, backend: str = "torch"):
        self.model = model
        self.tokenizer = tokenizer
        self.args = args
        self.cache_config = cache_config
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.backend = backend
        with torch.inference_mode():  # every tensor fed to the compiled step is an inference tensor (one guard set)
            self.pos = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.last_stats = GenerationStats()
        self._decode_fn = self._make_decode(compile)
        # the prompt's elementwise work in compiled kernels where compile is on and the GPU makes it pay (on the CPU
        # the prompt is bound by its matrix products, and a first prefill would wait for the compiler)
        model.fused_prefill = compile is True and torch.device(device).type == "cuda"

    # ------------------------------------------------------------------ setup
    def _make_decode(self, compile: bool | str | Callable) -> Callable[[Tensor, Tensor], Tensor]:
        if compile is False or compile is None:
            return self.model.decode
        if compile is True:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            return torch.compile(self.model.decode, fullgraph=True, dynamic=False, mode=mode)
        return torch.compile(self.model.decode, fullgraph=True, dynamic=False, backend=compile)

    def decode_step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """One decode step for every row (tokens, pos: (max_batch_size,)); returns logits (B, V) (a fresh tensor)."""
        with torch.inference_mode():
            return self._decode_fn(tokens, pos).clone()

    # ------------------------------------------------------------------ inputs
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"this generator has no tokenizer (weights='random'?): pass token ids, not {what}")
        return self.tokenizer

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of one prompt: a string (chat-templated with ``chat=True``), messages, or ids."""
        if isinstance(prompt, str):
            tok = self._need_tokenizer("text")
            if chat:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
                return tok.encode(text, add_bos=False)
            return tok.encode(prompt)
        seq = list(prompt)
        if seq and isinstance(seq[0], dict):
            tok = self._need_tokenizer("chat messages")
            text = tok.apply_chat_template(seq, add_generation_prompt=True)
            return tok.encode(text, add_bos=False)
        for i, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size:
                raise ValueError(f"prompt token #{i} = {t!r} is not a token id in [0, {self.args.vocab_size})")
        return seq

    def _as_batch(self, prompts: Any) -> tuple[list[Prompt], bool]:
        if isinstance(prompts, str):
            return [prompts], False
        if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int):
            return [prompts], False
        if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
            return [prompts], False
        if isinstance(prompts, Sequence) and len(prompts) > 0:
            return list(prompts), True
        raise ValueError("prompt must be a string, token ids, chat messages, or a non-empty list of those")

    def _check_lengths(self, ids: list[list[int]], max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        if len(ids) > self.max_batch_size:
            raise ValueError(f"{len(ids)} prompts exceed max_batch_size {self.max_batch_size} (set it at zmzoo.load)")
        for i, seq in enumerate(ids):
            if not seq:
                raise ValueError(f"prompt #{i} is empty")
            if len(seq) + max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt #{i} has {len(seq)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(seq) + max_new_tokens} > max_seq_len {self.max_seq_len}. Shorten the prompt, lower "
                    f"max_new_tokens, or load with a larger max_seq_len (nothing is truncated silently)"
                )

    def _stop_ids(self) -> set[int]:
        return set(self.tokenizer.eos_ids) if self.tokenizer is not None else set()

    # ------------------------------------------------------------------ core loop
    @torch.inference_mode()
    def _prefill(self, ids: list[list[int]], temperature, top_k, top_p, generator) -> Tensor:
        """Prefill every prompt into its row; returns the first sampled token of each row (B,)."""
        first = torch.zeros(self.max_batch_size, dtype=torch.int64, device=self.device)
        self.pos.zero_()
        with torch.inference_mode():
            for row, seq in enumerate(ids):
                toks = torch.tensor([seq], dtype=torch.int64, device=self.device)
                logits = self.model.prefill(toks, row=row)
                first[row] = sample(logits, temperature, top_k, top_p, generator)[0]
                self.pos[row] = len(seq)
        return first

    @torch.inference_mode()
    def _token_iter(self, ids: list[list[int]], max_new_tokens: int, temperature: float, top_k, top_p, seed,
                    sync_every: int, stop: list[str] | None = None) -> Iterator[Tensor]:
        """Yields blocks of new tokens (B, n) on the host every ``sync_every`` steps (the only host syncs); stops
        early once every row has hit an eos token or a stop string."""
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stats = GenerationStats(prompt_tokens=[len(s) for s in ids])
        self.last_stats = stats
        t0 = time.perf_counter()
        cur = self._prefill(ids, temperature, top_k, top_p, generator)
        block = [cur.clone()]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        rows: list[list[int]] = [[] for _ in ids]
        n_out = 1
        for step in range(1, max_new_tokens + 1):
            if len(block) >= sync_every or step == max_new_tokens:
                host = torch.stack(block, dim=1)[: len(ids)].cpu()
                block = []
                stats.decode_s = time.perf_counter() - t1
                stats.new_tokens = [n_out] * len(ids)
                yield host
                for r in range(len(ids)):
                    rows[r].extend(host[r].tolist())
                if step == max_new_tokens or all(self._finish(seq, stop)[2] for seq in rows):
                    return
            logits = self.decode_step(cur, self.pos)
            self.pos += 1
            cur = sample(logits, temperature, top_k, top_p, generator)
            block.append(cur)
            n_out += 1

    def _finish(self, seq: list[int], stop: list[str] | None) -> tuple[list[int], str, bool]:
        """Cut a row's tokens at the first stop token / stop string; returns (ids, text, stopped)."""
        stop_ids = self._stop_ids()
        for i, t in enumerate(seq):
            if t in stop_ids:
                seq = seq[:i]
                return seq, self._decode_text(seq, stop)[0], True
        text, hit = self._decode_text(seq, stop)
        return seq, text, hit

    def _decode_text(self, seq: list[int], stop: list[str] | None) -> tuple[str, bool]:
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(seq)
        for s in stop or []:
            j = text.find(s)
            if j >= 0:
                return text[:j], True
        return text, False

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Any, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, stop: str | list[str] | None = None, chat: bool = False,
                 seed: int | None = None, return_ids: bool = False) -> Any:
        """Generate from one prompt or a list of prompts; returns the new text only (str or list[str]).

        Args:
            prompts: a string, token ids (list[int]), chat messages (list[dict]), or a list of those.
            max_new_tokens: tokens to generate at most per prompt (prompt + this must fit max_seq_len).
            temperature: 0 for greedy; top_k / top_p filter the distribution when sampling.
            stop: string(s) that end generation (excluded from the text); eos tokens always stop.
            chat: apply the model's chat template to string prompts.
            return_ids: return the new token ids instead of text.
        """
        batch, is_batch = self._as_batch(prompts)
        stop = [stop] if isinstance(stop, str) else stop
        ids = [self.encode_prompt(p, chat) for p in batch]
        self._check_lengths(ids, max_new_tokens)
        rows: list[list[int]] = [[] for _ in ids]
        for host in self._token_iter(ids, max_new_tokens, temperature, top_k, top_p, seed, sync_every=16, stop=stop):
            for r in range(len(ids)):
                rows[r].extend(host[r].tolist())
        results = []
        for seq in rows:
            cut, text, _ = self._finish(seq[:max_new_tokens], stop)
            results.append(cut if return_ids else text)
        return results if is_batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, stop: str | list[str] | None = None, chat: bool = False,
               seed: int | None = None) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are generated (one prompt)."""
        stop = [stop] if isinstance(stop, str) else stop
        ids = [self.encode_prompt(prompt, chat)]
        self._check_lengths(ids, max_new_tokens)
        tok = self._need_tokenizer("text streaming")
        seq: list[int] = []
        emitted = ""
        for host in self._token_iter(ids, max_new_tokens, temperature, top_k, top_p, seed, sync_every=1, stop=stop):
            seq.extend(host[0].tolist())
            cut, text, stopped = self._finish(seq, stop)
            # hold back an incomplete UTF-8 piece and anything that may be the start of a stop string
            safe = text if stopped else text[: len(text) - _holdback(text, stop)]
            if safe.endswith("\ufffd"):
                safe = safe.rstrip("\ufffd")
            if len(safe) > len(emitted) and safe.startswith(emitted):
                yield safe[len(emitted):]
                emitted = safe
            if stopped:
                return
        final = self._finish(seq, stop)[1]
        if final.startswith(emitted) and len(final) > len(emitted):
            yield final[len(emitted):]
        del tok

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> Tensor:
        """Teacher-forced logits through the decode path: (len(continuation), V) fp32; row i predicts
        continuation[i] (row 0 comes from the prompt's prefill, row i from decoding continuation[i-1])."""
        prompt = self.encode_prompt(list(prompt_ids))
        cont = self.encode_prompt(list(continuation_ids)) if len(continuation_ids) else []
        if not cont:
            raise ValueError("score needs a non-empty continuation")
        self._check_lengths([prompt], len(cont))
        out = torch.empty(len(cont), self.args.vocab_size, dtype=torch.float32)
        with torch.inference_mode():
            self.pos.zero_()
            logits = self.model.prefill(torch.tensor([prompt], device=self.device), row=0)
            out[0] = logits[0].float().cpu()
            self.pos[0] = len(prompt)
            tokens = torch.zeros(self.max_batch_size, dtype=torch.int64, device=self.device)
            cont_dev = torch.tensor(cont, dtype=torch.int64, device=self.device)
            rows = []
            for i in range(1, len(cont)):
                tokens[0] = cont_dev[i - 1]
                rows.append(self.decode_step(tokens, self.pos)[0].float())
                self.pos += 1
            if rows:
                out[1:] = torch.stack(rows).cpu()
        return out

    def cache_stats(self) -> dict[str, Any]:
        """Bytes the caches hold and what a full cache of the same batch and max_seq_len would hold."""
        held = sum(c.nbytes() for c in self.model.caches)
        kv = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.model.caches)
        full = full_cache_nbytes(n_layers=self.args.n_layers, batch_size=self.max_batch_size,
                                 n_kv_heads=self.args.n_kv_heads, head_dim=self.args.head_dim,
                                 max_seq_len=self.max_seq_len, dtype=self.dtype)
        cfg = self.cache_config
        return {
            "method": cfg.method,
            "budget": cfg.budget,
            "slots": cfg.budget or self.max_seq_len,
            "max_seq_len": self.max_seq_len,
            "batch_size": self.max_batch_size,
            "cache_bytes": held,
            "kv_bytes": kv,
            "full_cache_bytes": full,
            "ratio": held / full,
        }


def _holdback(text: str, stop: list[str] | None) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop or []:
        for n in range(1, len(s)):
            if text.endswith(s[:n]):
                best = max(best, n)
    return best
