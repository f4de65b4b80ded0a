"""Shared test helpers: tiny real configs of every family, written as HF checkpoints (safetensors + config.json), and
the Hypothesis profiles of the property tests.

Hypothesis profiles, chosen by the environment variable ``HYPOTHESIS_PROFILE`` (README.md; docs/zeromerge.md,
section 6):

- ``ci`` (the default): bounded example counts, derandomized (every run draws the same examples), so CI time stays
  put and a failure reproduces by running the test again.
- ``long``: five times as many examples (3,300 generated cache histories over the property tests of
  tests/cache), random ones (a new run explores new histories; a failure prints the blob that reproduces it, and the
  example database under .hypothesis/ replays it first next time). ``HYPOTHESIS_PROFILE=long pytest tests/cache
  --hypothesis-show-statistics`` prints how many examples each test ran.

A property test takes its count from the profile through ``examples(n)``: n examples under ``ci``, scaled by the
profile's ``max_examples`` otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from zmzoo.models.config import ModelArgs

CI_EXAMPLES = 100  # the ci profile's max_examples: examples(n) is n examples there
_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_QUIET)
settings.register_profile("long", max_examples=5 * CI_EXAMPLES, derandomize=False, print_blob=True, **_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> settings:
    """Settings of a property test that runs ``n`` examples under the ``ci`` profile and as many times more under
    another profile as its ``max_examples`` exceeds ci's (``long``: 5 n); the rest comes from the loaded profile."""
    return settings(max_examples=max(1, math.ceil(n * settings.default.max_examples / CI_EXAMPLES)))


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA the Triton kernels (tests/ops) run in Triton's interpreter. Triton reads this when it is first imported
# (zmzoo.ops imports it, so any test module importing zmzoo.cache does), so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from zmzoo.cache.base import KVCache  # noqa: E402  (imports triton: only once TRITON_INTERPRET is set)

if os.environ.get("TRITON_INTERPRET") == "1":
    # bf16 as the GPU computes it, for every test that runs a kernel (tests/cache too, not only tests/ops): without
    # it the interpreter's tl.dot multiplies the raw bits of bf16 operands
    from zmzoo.ops._interpreter import fix_interpreter_bf16

    fix_interpreter_bf16()

TINY = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96, "vocab_size": 128}

FAMILIES = {
    "llama": ("llama2-7b", {}),
    "mistral": ("mistral-7b-v0.1", {"sliding_window": 6}),
    "qwen2": ("qwen2.5-0.5b", {}),
    "qwen3": ("qwen3-0.6b", {"head_dim": 32}),
    "smollm2": ("smollm2-135m", {"n_kv_heads": 1}),
}


class SDPACache(KVCache):
    """Test-only stand-in for a KV cache: fp32 causal attention over the prompt (prefill only), for logit parity."""

    method = "sdpa (test)"

    def __init__(self):
        torch.nn.Module.__init__(self)

    def prefill(self, q, k, v, row):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)


def tiny_args(family: str = "llama", **overrides) -> ModelArgs:
    name, extra = FAMILIES[family]
    return ModelArgs.from_name(name, **{**TINY, "max_position_embeddings": 256, **extra, **overrides})


def write_hf_checkpoint(path: Path, args: ModelArgs, seed: int = 0, **config) -> Path:
    """Build the HF transformers model for ``args`` with random weights and save it (safetensors) to ``path``;
    ``config``: more HF config entries (e.g. ``initializer_range``, the weights' std)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**{**args.to_hf_config(), **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_model(path: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@pytest.fixture
def tiny_ckpt(tmp_path):
    """Factory: tiny_ckpt(family, **overrides) -> (dir, ModelArgs)."""

    def make(family: str = "llama", seed: int = 0, **overrides):
        args = tiny_args(family, **overrides)
        d = tmp_path / f"{family}-{seed}"
        write_hf_checkpoint(d, args, seed)
        return d, args

    return make


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())


class SingleRuns:
    """Each prompt alone through a batch-1 generator, as a batch test's reference (``generate`` / ``score`` of a
    list, like a Generator's)."""

    def __init__(self, gen):
        self.gen, self.model = gen, gen.model

    def generate(self, prompts, **kw):
        return [self.gen.generate(p, **kw) for p in prompts]

    def score(self, prompts, conts):
        return [self.gen.score(p, c) for p, c in zip(prompts, conts)]


class Compared(NamedTuple):
    """What ``assert_same_function`` compared, per prompt: ``steps``, the decode steps whose teacher-forced logits were
    compared (the prefill's logits come on top); ``evictions``, how many of those steps' eviction decisions the
    compared logits depend on (see ``EvictionDecisions``); ``near_tie``, the step of the reference's first near-tie
    eviction decision (0: the prompt's own selection), where the comparison stopped, or None."""
    steps: list[int]
    evictions: list[int]
    near_tie: list[int | None]


class EvictionDecisions:
    """While active (a ``with`` block), records the eviction decisions of ``caches`` (those of policy "evict": h2o,
    tova, knorm) and which of them were near-ties, per batch row, by decode step (step i: the i-th decode step after
    the prompt of ``lengths[row]`` tokens; step 0: the prompt's own selection).

    - a decode step of a full row drops the lowest-scored slot of ``[0, S - ring)`` (``ops.slot_insert``): the
      decision is between the lowest and the second-lowest score there;
    - a prompt longer than the budget keeps its ``B - tail`` highest-scored tokens of the first ``T - tail``: between
      the last one kept and the first one dropped.

    A decision is a near-tie when those two scores are within ``2 * tie_rtol`` of their magnitude: then the
    reference's and the candidate's rounding can order them either way, either choice is right, and the two runs
    evict different tokens legitimately (KNorm: copies of one token have keys of equal norm, RoPE being a rotation,
    up to the last bit of each path's rounding; docs/performance.md, "GPU tests"). Relative only: TOVA's scores,
    attention probabilities, can be far below a logits ``atol``. The scores are read from the run's own buffers in
    eager Python (``slot_insert`` and the prompt hook), so the run must not be compiled.
    """

    def __init__(self, caches, lengths: list[int], tie_rtol: float):
        self.caches = [c for c in caches if getattr(c, "policy", None) == "evict"]
        self.lengths, self.tie_rtol = lengths, tie_rtol
        self.full = [set() for _ in lengths]  # decode steps at which the row evicted
        self.ties = [set() for _ in lengths]

    def _near(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() <= 2 * self.tie_rtol * torch.maximum(a.abs(), b.abs())

    def _insert(self, real, *args, **kw):
        s, pos = args[3], args[7]
        if kw.get("policy") == "evict" and s.data_ptr() in self._mine:
            s_len, ring = s.shape[2], kw["ring"]
            cand = s[:, :, : s_len - ring]
            if cand.shape[-1] >= 2:
                lo2 = cand.topk(2, dim=-1, largest=False).values  # (B, Hkv, 2): lowest, second lowest
                tie = self._near(lo2[..., 0], lo2[..., 1]).any(-1).tolist()
            else:
                tie = [False] * s.shape[0]
            for row, (p, full) in enumerate(zip(pos.tolist(), (pos >= s_len).tolist())):
                if row < len(self.lengths) and full:
                    step = p - self.lengths[row] + 1
                    self.full[row].add(step)
                    if tie[row]:
                        self.ties[row].add(step)
        return real(*args, **kw)

    def _prompt(self, cache, row, k, scores):
        from zmzoo.ops.prefill_scores import pool_scores

        t, n_top = k.shape[2], cache.budget - cache.tail  # evict: no dense region
        if scores is not None and t > cache.budget and row < len(self.lengths):
            head = pool_scores(scores, cache.score_pool)[:, : t - cache.tail]
            if 0 < n_top < head.shape[1]:
                srt = head.sort(dim=-1, descending=True).values
                if self._near(srt[:, n_top - 1], srt[:, n_top]).any():
                    self.ties[row].add(0)
        return None  # the scores as they are

    def __enter__(self):
        import zmzoo.cache.zeromerge as zm

        self._module, self._real = zm, zm.slot_insert
        self._mine = {c.s.data_ptr() for c in self.caches}
        zm.slot_insert = lambda *a, **kw: self._insert(self._real, *a, **kw)
        for c in self.caches:
            assert c.prompt_hook is None, "the cache already has a prompt hook"
            c.prompt_hook = lambda row, k, scores, c=c: self._prompt(c, row, k, scores)
        return self

    def __exit__(self, *exc):
        self._module.slot_insert = self._real
        for c in self.caches:
            c.prompt_hook = None

    def first_tie(self, row: int) -> int | None:
        return min(self.ties[row], default=None)


def _score_recording(ref, prompts, conts, tie_rtol: float | None) -> tuple[list[torch.Tensor], list, list]:
    """``ref.score(prompts, conts)`` with ``EvictionDecisions`` of its caches: (logits, first near-tie step per
    prompt, eviction steps per prompt). A ``SingleRuns`` reference scores each prompt alone, as its batch row 0.
    ``tie_rtol`` None: nothing recorded (no near-tie, no eviction counted)."""
    if tie_rtol is None:
        return ref.score(prompts, conts), [None] * len(prompts), [set() for _ in prompts]
    runs = [(ref.gen, [p], [c]) for p, c in zip(prompts, conts)] if isinstance(ref, SingleRuns) else \
        [(ref, prompts, conts)]
    logits, ties, full = [], [], []
    for gen, ps, cs in runs:
        rec = EvictionDecisions(gen.model.caches, [len(p) for p in ps], tie_rtol)
        if rec.caches and not (gen.compile is False or gen.compile is None):
            raise ValueError("assert_same_function reads the reference's eviction scores eagerly: pass an eager "
                             "reference (compile=False)")
        with rec:
            logits += gen.score(ps, cs)
        ties += [rec.first_tie(r) for r in range(len(ps))]
        full += rec.full
    return logits, ties, full


def assert_same_function(ref, got, prompts, max_new_tokens: int, *, rtol: float = 1e-4, atol: float = 1e-4,
                         buffers: bool = False, forced: list[list[int]] | None = None, tie_rtol: float | None = None,
                         min_steps: int = 0) -> Compared:
    """Two generators that must compute the same function by different code paths (Triton vs torch ops, compiled vs
    eager, a batch vs single runs): compare what they must match, never float-exact greedy tokens.

    1. teacher-forced logits: both score the reference's greedy continuation of every prompt (as batch rows), equal
       within ``rtol``/``atol``;
    2. with ``buffers``, every cache buffer after those same forced tokens, within the same tolerance;
    3. the candidate's own greedy tokens equal the reference's up to the first step whose top-2 margin (in the
       reference's logits) is below ``2 * atol`` plus the tolerance's relative part: past a near-tie either token is
       right, and the two runs part legitimately. Up to the first token where they part, the candidate's greedy run
       is the forced path, so its greedy token at each step is the argmax of its forced logits there.

    ``forced``: the continuations to teacher-force instead of the reference's greedy ones (``max_new_tokens`` is then
    unused); 3. then compares the argmax of both runs' forced logits, up to the same near-tie.

    ``tie_rtol``: caches that evict by score (policy "evict": h2o, tova, knorm) make a choice of the same kind at
    every full step, and where the reference's was a near-tie (``EvictionDecisions``: the two candidates' scores within
    ``2 * tie_rtol`` relative) either slot is right and the runs part from the next step on. With ``tie_rtol`` set,
    each prompt's logits and tokens are compared up to and including the decode step of its first near-tie decision
    (that step's logits are computed before its eviction), and with ``buffers`` the buffers after the last step
    before any prompt's first near-tie (both generators score again, that far). ``min_steps``: every prompt must
    have had at least that many decode steps compared, so a comparison cut short cannot pass vacuously. None (the
    default): no cut. Returns what was compared (``Compared``).
    """
    prompts = [list(p) for p in prompts]
    if forced is None:
        want = ref.generate(prompts, max_new_tokens=max_new_tokens, return_ids=True)
    else:
        want = [list(c) for c in forced]
    lr, ties, full = _score_recording(ref, prompts, want, tie_rtol)
    lg = got.score(prompts, want)
    have = [b.argmax(-1).tolist() for b in lg]
    if forced is not None:  # the reference's own choice at each forced step
        want_tokens = [a.argmax(-1).tolist() for a in lr]
    else:
        want_tokens = want
    done = Compared([], [], ties)
    for r, (a, b) in enumerate(zip(lr, lg)):
        rows = len(want[r]) if ties[r] is None else ties[r] + 1  # logits rows 0 .. rows - 1
        a, b = a[:rows], b[:rows]
        done.steps.append(rows - 1)
        done.evictions.append(sum(1 for i in full[r] if i <= rows - 2))  # step i's eviction shows from row i + 1
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, r=r: f"row {r} teacher-forced logits: {m}")
        top2 = a.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        tie = (margin <= 2 * (atol + rtol * top2[:, 0].abs())).nonzero()
        n = int(tie[0, 0]) if len(tie) else rows
        if have[r][:n] != want_tokens[r][:n]:
            first = next(i for i in range(n) if have[r][i] != want_tokens[r][i])
            raise AssertionError(f"row {r}: greedy tokens part at step {first}, before the first near-tie (step {n})")
    assert min(done.steps) >= min_steps, f"only {done.steps} decode steps compared (near-ties at {ties}), " \
                                         f"fewer than min_steps={min_steps}"
    if buffers and any(t == 0 for t in ties):
        raise AssertionError(f"the reference's prompt selection was a near-tie (rows {ties}): no buffer to compare")
    if buffers and any(t is not None for t in ties):
        cut = min(t for t in ties if t is not None)  # continuations of `cut` tokens: decode steps 1 .. cut - 1
        ref.score(prompts, [c[:cut] for c in want])
        got.score(prompts, [c[:cut] for c in want])
    if buffers:
        theirs = dict(got.model.named_buffers())  # by name: the two models may hold other buffers (quantized ones)
        bufs = {n: (a, theirs[n]) for n, a in ref.model.named_buffers()
                if n.startswith("layers.") and ".kv_cache." in n}
        for name, (a, b) in bufs.items():
            cache, _, leaf = name.rpartition(".")
            w = bufs.get(f"{cache}.w")
            if w is not None and leaf in ("k", "v", "dense_k", "dense_v"):
                # an empty slot (w = 0 in both runs) holds no token: what is left in it is unspecified (the
                # method's account, docs/zeromerge.md), so only live slots are compared
                torch.testing.assert_close(w[1], w[0], rtol=rtol, atol=atol, msg=lambda m, c=cache: f"{c}.w: {m}")
                live = (w[0] > 0)[..., : a.shape[2]].unsqueeze(-1)  # w: (ref's, candidate's)
                a, b = a * live, b * live
            if a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"buffer {n}: {m}")
            else:
                assert torch.equal(a, b), name
    return done
