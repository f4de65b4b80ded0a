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


def assert_same_function(ref, got, prompts, max_new_tokens: int, *, rtol: float = 1e-4, atol: float = 1e-4,
                         buffers: bool = False) -> None:
    """Two generators that must compute the same function by different code paths (Triton vs torch ops, compiled vs
    eager, a batch vs single runs): compare what they must match, never float-exact greedy tokens.

    1. teacher-forced logits: both score the reference's greedy continuation of every prompt (as batch rows), equal
       within ``rtol``/``atol``;
    2. with ``buffers``, every cache buffer after those same forced tokens, within the same tolerance;
    3. the candidate's own greedy tokens equal the reference's up to the first step whose top-2 margin (in the
       reference's logits) is below ``2 * atol`` plus the tolerance's relative part: past a near-tie either token is
       right, and the two runs part legitimately. Up to the first token where they part, the candidate's greedy run
       is the forced path, so its greedy token at each step is the argmax of its forced logits there.
    """
    prompts = [list(p) for p in prompts]
    want = ref.generate(prompts, max_new_tokens=max_new_tokens, return_ids=True)
    lr = ref.score(prompts, want)
    lg = got.score(prompts, want)
    have = [b.argmax(-1).tolist() for b in lg]
    for r, (a, b) in enumerate(zip(lr, lg)):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, r=r: f"row {r} teacher-forced logits: {m}")
        top2 = a.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        tie = (margin <= 2 * (atol + rtol * top2[:, 0].abs())).nonzero()
        n = int(tie[0, 0]) if len(tie) else len(want[r])
        if have[r][:n] != want[r][:n]:
            first = next(i for i in range(n) if have[r][i] != want[r][i])
            raise AssertionError(f"row {r}: greedy tokens part at step {first}, before the first near-tie (step {n})")
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
