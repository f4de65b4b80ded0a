"""Generator: tokenize, prefill, the compiled (and on CUDA graph-captured) decode step, sampling, stop, stream, score.

Every batch row is independent: each prompt is prefilled alone into its own cache row, then all rows decode together
with per-row positions held in a device tensor, and each row samples from its own random generator. The decode step
has static shapes and takes no host sync, so ``torch.compile(fullgraph=True)`` compiles it once and, on CUDA,
"reduce-overhead" replays one CUDA graph per token.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zmzoo.cache import CacheConfig, full_cache_nbytes
from zmzoo.models.config import ModelArgs
from zmzoo.models.transformer import RescoreStep, Transformer

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


def check_sampling(temperature: Any, top_k: Any, top_p: Any, seed: Any) -> None:
    """Reject sampling settings outside their range, naming the setting and what it allows."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or a whole number >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not math.isfinite(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be None or a number in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be None or a whole number")


class RowSampler:
    """Samples every batch row from its own ``torch.Generator``, each seeded with ``seed`` (rows beyond ``rows``, the
    unused ones, take the argmax), so a row draws the same tokens in a batch as alone. ``seed=None``: each row's
    generator is seeded from torch's global random state."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int | None, rows: int,
                 device: torch.device):
        self.temperature, self.top_k, self.top_p, self.rows = temperature, top_k, top_p, rows
        self.generators: list[torch.Generator] = []
        if temperature > 0:
            seeds = [seed] * rows if seed is not None else torch.randint(2**62, (rows,)).tolist()
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.generators:
            return logits.argmax(-1)
        picked = [sample(logits[r : r + 1], self.temperature, self.top_k, self.top_p, g)
                  for r, g in enumerate(self.generators)]
        if logits.shape[0] > self.rows:
            picked.append(logits[self.rows :].argmax(-1))
        return torch.cat(picked)

    def row(self, r: int, logits: Tensor) -> Tensor:
        """Row ``r``'s token from its logits (1, V)."""
        if not self.generators:
            return logits.argmax(-1)
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generators[r])


class RowText:
    """One row's new text, detokenized incrementally (each token decodes a few tokens, not the whole text) and cut at
    the first stop token or stop string. ``pieces`` collects what is safe to show: complete characters and nothing
    that may be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: list[str], stop_ids: set[int]):
        self.tok, self.stop, self.stop_ids = tokenizer, stop, stop_ids
        self.ids: list[int] = []  # up to the first stop token
        self.text = ""  # decoded so far, cut at a stop string once one appears
        self.done = False
        self._prefix = self._read = 0  # ids[prefix:read] is the context the next piece is decoded against
        self._shown = 0  # characters of text handed out by take()
        self._longest = max((len(s) for s in stop), default=0)

    def add(self, new_ids: Sequence[int]) -> None:
        for t in new_ids:
            if self.done:
                return
            if t in self.stop_ids:
                self.done = True
                return
            self.ids.append(t)
            if self.tok is None:
                continue
            context = self.tok.decode(self.ids[self._prefix : self._read])
            full = self.tok.decode(self.ids[self._prefix :])
            if len(full) > len(context) and not full.endswith("\ufffd"):  # a complete character (UTF-8) arrived
                self._append(full[len(context) :])
                self._prefix, self._read = self._read, len(self.ids)

    def _append(self, piece: str) -> None:
        old = len(self.text)
        self.text += piece
        if self.stop:
            lo = max(0, old - self._longest + 1)
            hits = [j for j in (self.text.find(s, lo) for s in self.stop) if j >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.done = True

    def finish(self) -> None:
        """Flush what an incomplete character held back (the text then equals a decode of all ids, cut at a stop)."""
        if self.tok is not None and not self.done and self._read < len(self.ids):
            context = self.tok.decode(self.ids[self._prefix : self._read])
            self._append(self.tok.decode(self.ids[self._prefix :])[len(context) :])
            self._prefix = self._read = len(self.ids)
        self.done = True

    def take(self) -> str:
        """The text not handed out yet, holding back a tail that may begin a stop string (unless done)."""
        end = len(self.text)
        if not self.done:
            end -= _holdback(self.text, self.stop)
        piece = self.text[self._shown : end]
        self._shown = max(self._shown, end)
        return piece


class Generator:
    """A loaded model with its preallocated caches. Build it with ``zmzoo.load``."""

    def __init__(self, model: Transformer, tokenizer: Any, args: ModelArgs, cache_config: CacheConfig, *,
                 device: torch.device, dtype: torch.dtype, max_seq_len: int, max_batch_size: int,
                 compile: bool | str | Callable = False, backend: str = "torch", gemv: str = "torch",
                 verbose: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self._classes: np.ndarray | None = None  # the tokenizer's word classes, built on a prefill draft's first lookup
        self.args = args
        self.cache_config = cache_config
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.backend = backend
        self.gemv = gemv
        self.compile = compile
        self.verbose = verbose
        with torch.inference_mode():  # every tensor fed to the compiled step is an inference tensor (one guard set)
            self.pos = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.last_stats = GenerationStats()
        self._decode_fn = self._make_decode(compile)
        self._compiled = compile is False or compile is None  # True once the first (compiling) call is done
        # a lookahead's rescore (Transformer.finish_prefill), compiled with the decode step's backend (no CUDA graphs:
        # its shapes change with every prompt length); eager when the decode step is
        self._rescore_fn = None if self._compiled else RescoreStep(self._backend(compile))
        self._rescore_compiled = self._compiled

    # ------------------------------------------------------------------ setup
    def _make_decode(self, compile: bool | str | Callable) -> Callable[[Tensor, Tensor], Tensor]:
        if compile is False or compile is None:
            return self.model.decode
        if compile is True:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            return torch.compile(self.model.decode, fullgraph=True, dynamic=False, mode=mode)
        return torch.compile(self.model.decode, fullgraph=True, dynamic=False, backend=compile)

    @staticmethod
    def _backend(compile: bool | str | Callable) -> str | Callable:
        return "inductor" if compile is True else compile

    def rescore_step(self, *args: Any) -> tuple[Tensor, Tensor]:
        """One layer of a lookahead's rescore (``zmzoo.models.transformer.rescore_layer``), compiled: what this
        Generator hands to ``Transformer.finish_prefill`` when it compiles. The first call, in the first prefill
        whose prompt a lookahead compresses, compiles it for every layer and prompt length (and says so when the
        Generator is verbose)."""
        if self._rescore_compiled:
            return self._rescore_fn(*args)
        t0 = time.perf_counter()
        if self.verbose:
            print(f"[zmzoo] compiling the lookahead's rescore (one graph that the {self.args.n_layers} layers reuse, "
                  f"for any prompt length); this first compressed prompt waits for the compiler, later ones do not",
                  file=sys.stderr, flush=True)
        out = self._rescore_fn(*args)
        self._rescore_compiled = True
        if self.verbose:
            print(f"[zmzoo] rescore compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out

    def decode_step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """One decode step for every row (tokens, pos: (max_batch_size,)); returns logits (B, V) (a fresh tensor).
        The first call of a compiled step compiles it (and says so when the Generator is verbose). ``tokens`` are not
        checked (that would read them back from the device every step): pass ids in [0, vocab_size), as the sampled
        tokens and ``score``'s continuations (checked on the host before they are copied there) are."""
        if not self._compiled:
            return self._first_call(tokens, pos)
        with torch.inference_mode():
            return self._decode_fn(tokens, pos).clone()

    def _first_call(self, tokens: Tensor, pos: Tensor) -> Tensor:
        t0 = time.perf_counter()
        if self.verbose:
            where = "one CUDA graph replayed per token" if self.device.type == "cuda" else "inductor, CPU"
            print(f"[zmzoo] compiling the decode step ({self.args.n_layers} layers, {where}); this first call waits "
                  f"for the compiler, later ones do not", file=sys.stderr, flush=True)
        with torch.inference_mode():
            out = self._decode_fn(tokens, pos).clone()
        self._compiled = True
        if self.verbose:
            print(f"[zmzoo] decode step compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out

    def with_cache(self, method: str | None = None, *, kv_ratio: float | None = None, kv_budget: int | None = None,
                   preset: str | None = None, max_seq_len: int | None = None, max_batch_size: int | None = None,
                   compile: bool | str | Callable | None = None, **cache_settings: Any) -> Generator:
        """Another Generator on the same weights and tokenizer (shared, not copied) with caches of its own: the
        settings as ``zmzoo.load`` takes them (method, budget, preset, cache settings; ``max_seq_len``,
        ``max_batch_size`` and ``compile`` default to this Generator's). Both stay usable; drop one to free its
        caches."""
        from zmzoo.loading import make_generator

        return make_generator(self.model.shared_copy(), self.tokenizer, self.args, device=self.device,
                              dtype=self.dtype, max_seq_len=max_seq_len or self.max_seq_len,
                              max_batch_size=max_batch_size or self.max_batch_size,
                              compile=self.compile if compile is None else compile, backend=self.backend,
                              gemv=self.gemv, verbose=self.verbose, act_quant=self.model.act_quant, method=method,
                              kv_ratio=kv_ratio, kv_budget=kv_budget, preset=preset, **cache_settings)

    def _seed(self, temperature: float, seed: int | None) -> int | None:
        """The sampling seed: ``seed``, or for a tensor-parallel model sampling without one, a seed drawn on rank 0
        and shared, so that every rank draws the same tokens (their logits are the same: the LM head is
        replicated)."""
        tp = self.model.tp
        if seed is not None or temperature <= 0 or tp is None or tp.world == 1:
            return seed
        return tp.same_on_every_rank(int(torch.randint(2**62, ()).item()))

    # ------------------------------------------------------------------ inputs
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"this generator has no tokenizer (weights='random'?): pass token ids, not {what}")
        return self.tokenizer

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids of one prompt: a string (chat-templated with ``chat=True``), messages, or ids (checked: each a
        token id in [0, vocab_size))."""
        return self._encode(prompt, chat, "prompt")

    def _check_ids(self, seq: list, what: str) -> None:
        """Every element of ``seq`` an int (not a bool) in [0, vocab_size), on the host: the embedding would raise a
        bare IndexError on CPU and a device-side assert on CUDA. ``what`` names the sequence in the error ("prompt
        #0")."""
        vocab = self.args.vocab_size
        for i, t in enumerate(seq):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{what} token #{i} = {t!r} is not a token id in [0, {vocab})")

    def _encode(self, prompt: Prompt, chat: bool, what: str) -> list[int]:
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
        self._check_ids(seq, what)
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

    def _check_lengths(self, ids: list[list[int]], max_new_tokens: Any) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1")
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

    def _stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop={stop!r}: every stop string must be a non-empty str")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (this generator has none): stop on token ids instead")
        return stops

    def _row_texts(self, n: int, stop: list[str]) -> list[RowText]:
        stop_ids = set(self.tokenizer.eos_ids) if self.tokenizer is not None else set()
        return [RowText(self.tokenizer, stop, stop_ids) for _ in range(n)]

    def lookup_classes(self, caches: Sequence[Any] | None = None) -> np.ndarray | None:
        """The classes a prefill draft's prompt lookup compares tokens by (``Transformer.finish_prefill``): the
        tokenizer's word classes over the model's vocabulary (ids past the tokenizer's: classes of their own), built
        once; None without a tokenizer (ids compared as they are) or when none of ``caches`` (default: this
        Generator's) has a draft pending."""
        caches = self.model.caches if caches is None else caches
        if self.tokenizer is None or not any(c.draft_request() for c in caches):
            return None
        if self._classes is None:
            cls = self.tokenizer.word_classes[: self.args.vocab_size]
            self._classes = np.concatenate([cls, np.arange(len(cls), self.args.vocab_size, dtype=np.int64)])
        return self._classes

    # ------------------------------------------------------------------ core loop
    @torch.inference_mode()
    def prefill(self, ids: Sequence[Sequence[int]]) -> list[Tensor]:
        """Prefill prompt i (token ids) into batch row i, then run the caches' prefill draft if they want one
        (``Transformer.finish_prefill``: ZeroMerge's lookahead, drafted through this Generator's decode step and, when
        it compiles, rescored through its compiled ``rescore_step``). Returns
        each row's last-position logits (1, V) and leaves ``pos`` at the prompts' lengths, ready for ``decode_step``:
        what ``generate`` and ``score`` do first, for benchmarks and probes that drive the decode step themselves.
        Every id is checked on the host before anything runs (an error names the prompt, the position and the id)."""
        ids = [list(seq) for seq in ids]
        if len(ids) > self.max_batch_size or not all(ids):
            raise ValueError(f"prefill takes 1 to max_batch_size ({self.max_batch_size}) non-empty prompts")
        for row, seq in enumerate(ids):
            self._check_ids(seq, f"prompt #{row}")
        self.pos.zero_()
        greedy = torch.zeros(self.max_batch_size, dtype=torch.int64, device=self.device)
        out = []
        for row, seq in enumerate(ids):
            toks = torch.tensor([seq], dtype=torch.int64, device=self.device)
            logits = self.model.prefill(toks, row=row)
            out.append(logits)
            greedy[row] = logits[0].argmax()
            self.pos[row] = len(seq)
        self.model.finish_prefill(greedy, self.pos, self.decode_step, prompts=ids, classes=self.lookup_classes(),
                                  rescore=None if self._rescore_fn is None else self.rescore_step)
        return out

    @torch.inference_mode()
    def _prefill(self, ids: list[list[int]], sampler: RowSampler) -> Tensor:
        """Prefill every prompt into its row; returns the first sampled token of each row (B,)."""
        first = torch.zeros(self.max_batch_size, dtype=torch.int64, device=self.device)
        for row, logits in enumerate(self.prefill(ids)):
            first[row] = sampler.row(row, logits)[0]
        return first

    @torch.inference_mode()
    def _token_iter(self, ids: list[list[int]], max_new_tokens: int, sampler: RowSampler,
                    sync_every: int) -> Iterator[Tensor]:
        """Yields blocks of new tokens (rows, n) on the host every ``sync_every`` tokens (the only host syncs). The
        next step is queued before a block is read back, so the device keeps working while the host decodes text;
        the caller stops the iteration when every row is done (one queued step is then wasted)."""
        stats = GenerationStats(prompt_tokens=[len(s) for s in ids])
        self.last_stats = stats
        t0 = time.perf_counter()
        cur = self._prefill(ids, sampler)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        block, made, shown = [cur], 1, 0
        while True:
            last = made >= max_new_tokens
            if not last:  # queued before the block below is read back
                logits = self.decode_step(cur, self.pos)
                self.pos += 1
                cur = sampler(logits)
                made += 1
            if last or len(block) >= sync_every:
                host = torch.stack(block, dim=1)[: len(ids)].cpu()
                shown += host.shape[1]
                stats.decode_s = time.perf_counter() - t1
                stats.new_tokens = [shown] * len(ids)
                yield host
                block = []
            if last:
                return
            block.append(cur)

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
            seed: seeds each row's sampling (a row gives the same tokens in a batch as alone).
            return_ids: return the new token ids (up to the first eos) instead of text.
        """
        check_sampling(temperature, top_k, top_p, seed)
        stops = self._stops(stop)
        batch, is_batch = self._as_batch(prompts)
        ids = [self._encode(p, chat, f"prompt #{i}" if is_batch else "prompt") for i, p in enumerate(batch)]
        self._check_lengths(ids, max_new_tokens)
        rows = self._row_texts(len(ids), stops)
        sampler = RowSampler(temperature, top_k, top_p, self._seed(temperature, seed), len(ids), self.device)
        for host in self._token_iter(ids, max_new_tokens, sampler, sync_every=16):
            for r, row in enumerate(rows):
                row.add(host[r].tolist())
            if all(row.done for row in rows):
                break
        for row in rows:
            row.finish()
        results = [row.ids if return_ids else row.text for row in rows]
        return results if is_batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, stop: str | list[str] | None = None, chat: bool = False,
               seed: int | None = None) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are generated (one prompt); the pieces join to what
        ``generate`` returns for the same arguments."""
        self._need_tokenizer("text streaming")
        check_sampling(temperature, top_k, top_p, seed)
        stops = self._stops(stop)
        ids = [self.encode_prompt(prompt, chat)]
        self._check_lengths(ids, max_new_tokens)
        (row,) = self._row_texts(1, stops)
        sampler = RowSampler(temperature, top_k, top_p, self._seed(temperature, seed), 1, self.device)
        for host in self._token_iter(ids, max_new_tokens, sampler, sync_every=1):
            row.add(host[0].tolist())
            piece = row.take()
            if piece:
                yield piece
            if row.done:
                break
        row.finish()
        piece = row.take()
        if piece:
            yield piece

    @torch.inference_mode()
    def score(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
              continuation_ids: Sequence[int] | Sequence[Sequence[int]]) -> Tensor | list[Tensor]:
        """Teacher-forced logits through the decode path: (len(continuation), V) fp32; row i predicts
        continuation[i] (row 0 comes from the prompt's prefill, row i from decoding continuation[i-1]).

        A list of prompts with a list of continuations (one each) scores them as batch rows together and returns a
        list of such tensors."""
        if isinstance(prompt_ids, Tensor):
            prompt_ids = prompt_ids.tolist()
        if isinstance(continuation_ids, Tensor):
            continuation_ids = continuation_ids.tolist()
        batched = len(prompt_ids) > 0 and not isinstance(prompt_ids[0], int)
        prompts = [list(p) for p in prompt_ids] if batched else [list(prompt_ids)]
        conts = [list(c) for c in continuation_ids] if batched else [list(continuation_ids)]
        if len(prompts) != len(conts):
            raise ValueError(f"score: {len(prompts)} prompts but {len(conts)} continuations (one each)")
        prompts = [self._encode(p, False, f"prompt #{r}") for r, p in enumerate(prompts)]
        # the continuation's ids are checked here, on the host: they reach the decode step as a device tensor
        conts = [self._encode(c, False, f"continuation #{r}") if c else [] for r, c in enumerate(conts)]
        if any(not c for c in conts):
            raise ValueError("score needs a non-empty continuation for every prompt")
        n = max(len(c) for c in conts)
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch_size {self.max_batch_size} (set it at "
                             f"zmzoo.load)")
        for r, p in enumerate(prompts):
            if not p:
                raise ValueError(f"score: prompt #{r} is empty")
            if len(p) + n > self.max_seq_len:
                raise ValueError(f"score: prompt #{r} ({len(p)} tokens) and the longest continuation ({n}) exceed "
                                 f"max_seq_len {self.max_seq_len}")
        outs = [torch.empty(len(c), self.args.vocab_size, dtype=torch.float32) for c in conts]
        for r, logits in enumerate(self.prefill(prompts)):
            outs[r][0] = logits[0].float().cpu()
        # a row whose continuation is shorter repeats its last token past it (those logits are not kept; no row reads
        # another's cache, and every position stays below max_seq_len, checked above)
        # step-major (n, B): each step's tokens are a row with stride 1 whatever B (a column of (B, n) at B = 1 has
        # stride n, which the compiled step, first called with contiguous tokens, e.g. a draft's, compiles again for)
        forced = torch.zeros(n, self.max_batch_size, dtype=torch.int64)
        for r, c in enumerate(conts):
            forced[: len(c), r] = torch.tensor(c)
            forced[len(c) :, r] = c[-1]
        forced = forced.to(self.device)
        chunk: list[Tensor] = []
        for i in range(1, n):
            chunk.append(self.decode_step(forced[i - 1], self.pos).float())
            self.pos += 1
            if len(chunk) == 64 or i == n - 1:  # to the host in blocks: (steps, V) per row stays bounded on device
                host = torch.stack(chunk, 1).cpu()  # (B, steps, V)
                for r, c in enumerate(conts):
                    a = i - len(chunk) + 1  # first row index of outs this block fills
                    if a < len(c):
                        outs[r][a : min(i + 1, len(c))] = host[r, : min(i + 1, len(c)) - a]
                chunk = []
        return outs if batched else outs[0]

    def cache_stats(self) -> dict[str, Any]:
        """Bytes the caches hold and what a full cache of the same batch and max_seq_len would hold, beside the
        weights' bytes: ``weight_bytes`` in memory, ``weight_bytes_per_step`` read by one decode step (less an untied
        embedding table), and ``quantization`` (what ``zmzoo.load`` quantized, or None). A tensor-parallel rank's
        figures are its own (its heads' caches, its part of the weights); ``tensor_parallel`` is the world size."""
        held = sum(c.nbytes() for c in self.model.caches)
        kv = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in self.model.caches)
        local = self.model.args  # a tensor-parallel rank's: its KV heads
        full = full_cache_nbytes(n_layers=local.n_layers, batch_size=self.max_batch_size,
                                 n_kv_heads=local.n_kv_heads, head_dim=local.head_dim,
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
            **self.model.weight_nbytes(),
            "quantization": self.model.quantization,
            "tensor_parallel": self.model.tp.world if self.model.tp is not None else 1,
        }


def _holdback(text: str, stop: list[str] | None) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop or []:
        for n in range(1, len(s)):
            if text.endswith(s[:n]):
                best = max(best, n)
    return best
