"""zmzoo.compare_caches and FanoutCache: configurations side by side equal each configuration run alone."""

from __future__ import annotations

import pytest
import torch

import zmzoo
from tests.conftest import TINY
from zmzoo.cache import FanoutCache, FullCache

CONFIGS = {
    "full": {"method": "full"},
    "zeromerge": {"method": "zeromerge", "kv_budget": 12},
    "h2o": {"method": "h2o", "kv_budget": 12},
    "streaming": {"method": "streaming", "kv_budget": 12},
    "snapkv": {"method": "snapkv", "kv_budget": 12},
    "retrieval": {"method": "zeromerge", "kv_budget": 12, "preset": "retrieval"},  # a 32-token draft
    "lookahead4": {"method": "zeromerge", "kv_budget": 12, "lookahead": 4},  # a shorter one beside it
    "paper-v2": {"method": "zeromerge", "kv_budget": 12, "preset": "paper-v2"},
    "ratio": {"method": "zeromerge", "kv_ratio": 0.25, "tail": 0.5},  # a fraction of max_seq_len
}


@pytest.fixture(scope="module")
def gen():
    return zmzoo.load("llama2-7b", weights="random", args_overrides={**TINY, "max_position_embeddings": 256},
                      device="cpu", dtype=torch.float32, compile=False, max_seq_len=32, method="full", verbose=False)


def sample(n_prompt=48, n_cont=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 128, (n_prompt,), generator=g).tolist(),
            torch.randint(0, 128, (n_cont,), generator=g).tolist())


def test_rows_equal_configurations_alone(gen):
    prompt, cont = sample()
    res = zmzoo.compare_caches(gen, CONFIGS, prompt, steps=len(cont), forced=cont, attention_error=True)
    assert res.labels == list(CONFIGS) and not res.skipped
    assert res.max_seq_len == len(prompt) + len(cont) and res.prefill_max_diff == 0.0
    assert res.logits.shape == (len(CONFIGS), len(cont), 128) and res.tokens.shape == (len(CONFIGS), len(cont))
    assert res.cache_configs["ratio"].budget == 15  # floor(0.25 * 60)
    for label, settings in CONFIGS.items():
        alone = gen.with_cache(**settings, max_seq_len=res.max_seq_len)
        torch.testing.assert_close(res.logits[res.row(label)], alone.score(prompt, cont), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, label=label: f"{label}: {m}")
        assert res.tokens_of(label) == res.logits[res.row(label)].argmax(-1).tolist()


def test_greedy_rows_follow_their_own_tokens(gen):
    """Greedy side by side: each row's tokens are the argmax chain of its own teacher-forced logits."""
    prompt, _ = sample(seed=2)
    greedy = zmzoo.compare_caches(gen, CONFIGS, prompt, steps=10)
    assert greedy.logits is None and greedy.attention_error is None
    for label in ("full", "zeromerge", "retrieval"):
        toks = greedy.tokens_of(label)
        forced = zmzoo.compare_caches(gen, {label: CONFIGS[label]}, prompt, steps=10, forced=toks,
                                      max_seq_len=greedy.max_seq_len)
        assert forced.tokens_of(label) == toks, label


def test_stop_ids_end_greedy_decoding_once_every_row_stopped(gen):
    """With stop_ids the run ends at the first look (every stop_every steps) where every row has produced one; the
    tokens up to there are those of the run without stops (no row changes)."""
    prompt, _ = sample(seed=2)
    configs = {k: CONFIGS[k] for k in ("full", "zeromerge", "h2o")}
    ref = zmzoo.compare_caches(gen, configs, prompt, steps=12)
    stops = {row[3] for row in ref.tokens.tolist()}  # every row has produced one by step 3
    last = max(min(j for j, t in enumerate(row) if t in stops) for row in ref.tokens.tolist())  # the last to stop
    for every in (1, 4):
        res = zmzoo.compare_caches(gen, configs, prompt, steps=12, stop_ids=stops, stop_every=every)
        n = res.tokens.shape[1]
        assert n == min(12, (last // every + 1) * every), every  # looked after tokens every, 2 * every, ...
        assert torch.equal(res.tokens, ref.tokens[:, :n])
        assert res.prefill_s > 0 and res.decode_s >= 0
    never = zmzoo.compare_caches(gen, configs, prompt, steps=12, stop_ids=[t for t in range(128)
                                                                          if t not in ref.tokens.unique().tolist()])
    assert torch.equal(never.tokens, ref.tokens)
    with pytest.raises(ValueError, match="greedy"):
        zmzoo.compare_caches(gen, configs, prompt, steps=2, forced=[1, 2], stop_ids=[3])


def test_attention_error_zero_for_full_positive_past_budget(gen):
    prompt, cont = sample(n_prompt=40, n_cont=8)
    configs = {"full": {"method": "full"}, "zeromerge": {"method": "zeromerge", "kv_budget": 10},
               "h2o": {"method": "h2o", "kv_budget": 10}, "roomy": {"method": "zeromerge", "kv_budget": 48}}
    res = zmzoo.compare_caches(gen, configs, prompt, steps=len(cont), forced=cont, attention_error=True)
    err = res.attention_error
    assert err.shape == (4, TINY["n_layers"]) and res.attention_steps == len(cont) - 1
    assert (err[res.row("full")] == 0).all()
    assert (err[res.row("zeromerge")] > 0).all() and (err[res.row("h2o")] > 0).all()
    assert (err[res.row("roomy")] < 1e-5).all()  # 48 slots hold the prompt and every decoded token: no compression


def test_invalid_configurations_are_skipped_with_the_reason(gen):
    prompt, _ = sample(n_prompt=20)
    configs = {"ok": {"method": "zeromerge", "kv_budget": 8}, "small": {"method": "zeromerge", "kv_budget": 2},
               "sinks": {"method": "streaming", "kv_budget": 5}, "full": {"method": "full"}}
    res = zmzoo.compare_caches(gen, configs, prompt, steps=3)
    assert res.labels == ["ok", "full"] and set(res.skipped) == {"small", "sinks"}
    assert "tail" in res.skipped["small"] and "sinks + 2" in res.skipped["sinks"]
    with pytest.raises(KeyError, match="skipped"):
        res.row("small")
    none = zmzoo.compare_caches(gen, {"small": configs["small"]}, prompt, steps=3)
    assert none.labels == [] and none.tokens.shape == (0, 3)
    with pytest.raises(TypeError, match="sinks"):  # a setting the method does not take is an error, not a skip
        zmzoo.compare_caches(gen, {"bad": {"method": "zeromerge", "kv_budget": 8, "sinks": 2}}, prompt, steps=3)
    with pytest.raises(ValueError, match="forced has 2 tokens"):
        zmzoo.compare_caches(gen, configs, prompt, steps=3, forced=[1, 2])


def test_leaves_the_generator_and_its_weights_alone(gen):
    prompt, cont = sample(n_prompt=16, n_cont=6)
    before = gen.score(prompt, cont)
    ptrs = {n: p.data_ptr() for n, p in gen.model.named_parameters()}
    caches = [id(c) for c in gen.model.caches]
    zmzoo.compare_caches(gen, CONFIGS, prompt, steps=4, attention_error=True)
    assert {n: p.data_ptr() for n, p in gen.model.named_parameters()} == ptrs
    assert [id(c) for c in gen.model.caches] == caches
    torch.testing.assert_close(gen.score(prompt, cont), before, rtol=0, atol=0)


def test_compiled_equals_eager(gen):
    """The fan-out traces as one graph (fullgraph=True; dynamo's "eager" backend keeps the test fast)."""
    prompt, cont = sample(n_prompt=30, n_cont=4, seed=3)
    configs = {"zeromerge": CONFIGS["zeromerge"]}  # with the shadow: the whole fan-out under fullgraph=True
    eager = zmzoo.compare_caches(gen, configs, prompt, steps=len(cont), forced=cont, attention_error=True)
    comp = zmzoo.compare_caches(gen, configs, prompt, steps=len(cont), forced=cont, attention_error=True,
                                compile="eager")
    torch.testing.assert_close(comp.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp.attention_error, eager.attention_error, rtol=1e-4, atol=1e-7)


def test_fanout_checks_its_parts():
    kw = dict(n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=16, dtype=torch.float32, device="cpu")
    one = FullCache(batch_size=1, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        FanoutCache([FullCache(batch_size=2, **kw)])
    with pytest.raises(ValueError, match="shadow has batch_size"):
        FanoutCache([one, FullCache(batch_size=1, **kw)], shadow=FullCache(batch_size=1, **kw))
    fan = FanoutCache([one])
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="row 0"):
        fan.prefill(q, k, k, row=1)


@pytest.mark.parametrize("where", ["prompt", "forced"])
@pytest.mark.parametrize("bad", [-1, 128, True])
def test_out_of_range_ids_are_named(gen, where, bad):
    """A token id outside the vocabulary (or a bool) is refused before anything runs, naming the sequence, position and
    id (the embedding would raise a bare IndexError, or a device-side assert on CUDA)."""
    prompt, forced = list(range(3, 13)), [5, 6, 7]
    if where == "prompt":
        prompt[4] = bad
    else:
        forced[1] = bad
    pos = 4 if where == "prompt" else 1
    with pytest.raises(ValueError, match=rf"compare_caches: {where} token #{pos} = {bad!r} is not a token id in "
                                         rf"\[0, {gen.args.vocab_size}\)"):
        zmzoo.compare_caches(gen, {"full": {"method": "full"}}, prompt, steps=3, forced=forced)
