"""Generator behaviour on tiny random models: cached decode vs uncached forward, batch rows, compile once, buffers."""

from __future__ import annotations

import os

import pytest
import torch

import zmzoo
from tests.conftest import TINY

SMALL = {**TINY, "max_position_embeddings": 256}


# ZMZOO_TEST_DEVICE=cuda runs the generator tests on a GPU (the Triton kernels compiled, CUDA graphs on): the
# GPU parity check of bench/h200.sh. CI runs them on the CPU.
DEVICE = os.environ.get("ZMZOO_TEST_DEVICE", "cpu")


def tiny_gen(method=None, compile=False, max_batch_size=1, max_seq_len=96, name="llama2-7b", **kw):
    overrides = {**SMALL, **kw.pop("args_overrides", {})}
    return zmzoo.load(name, weights="random", args_overrides=overrides, device=DEVICE, dtype=torch.float32,
                      compile=compile, max_batch_size=max_batch_size, max_seq_len=max_seq_len, method=method, **kw)


@pytest.mark.parametrize("name", ["llama2-7b", "qwen3-0.6b", "qwen2.5-0.5b"])
def test_cached_decode_equals_uncached_forward(name):
    gen = tiny_gen(name=name)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = gen.model.prefill(ids, row=0, all_logits=True)[0]  # uncached: one causal pass over everything
    got = gen.score(ids[0, :7].tolist(), ids[0, 7:].tolist())
    torch.testing.assert_close(got, full[6:29], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,kw", [("full", {}), ("zeromerge", {"kv_budget": 12})])
def test_batch_rows_match_single_runs(method, kw):
    """Every row of a batch computes what it computes alone: teacher-forced logits equal to fp32 tolerance, greedy
    tokens up to the first near-tie (a batch of 4 rows multiplies other shapes than one row, so floats may part)."""
    from tests.conftest import SingleRuns, assert_same_function

    prompts = [[5, 9, 11, 3, 7, 1, 2], [8, 8, 1], list(range(20, 45))]
    single = SingleRuns(tiny_gen(method=method, **kw))
    batched = tiny_gen(method=method, max_batch_size=4, **kw)
    assert_same_function(single, batched, prompts, 12, rtol=1e-5, atol=1e-5 if DEVICE == "cpu" else 1e-4)


def test_sampled_rows_match_single_runs():
    """With sampling, each row draws from its own generator seeded with ``seed``: a batch gives every row the tokens
    it gets alone (the batch's logits equal the single runs' to fp32 rounding, so the draws agree)."""
    prompts = [[5, 9, 11, 3, 7, 1, 2], [8, 8, 1], list(range(20, 45))]
    single, batched = tiny_gen(), tiny_gen(max_batch_size=4)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, seed=7, return_ids=True)
    assert batched.generate(prompts, **kw) == [single.generate(p, **kw) for p in prompts]
    # different seeds draw differently (the rows are not all seeded alike by accident)
    draws = {tuple(single.generate(prompts[0], **{**kw, "seed": s})) for s in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("method", ["full", "zeromerge", "zeromerge:retrieval"])
def test_compiled_decode_compiles_once(method):
    """The decode step compiles once (its draft too, with the retrieval preset: the 20-token prompt exceeds the
    budget), and so does the preset's rescore, for both of its layers (``rescore_layer``: a graph of its own)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.testing import CompileCounter

    from zmzoo.models.transformer import Transformer, rescore_layer

    torch._dynamo.reset()
    counter = CompileCounter()
    method, _, preset = method.partition(":")
    kw = {"kv_budget": 16, "preset": preset or None} if method == "zeromerge" else {}
    gen = tiny_gen(method=method, compile=counter, max_batch_size=2, **kw)
    ptrs = {n: b.data_ptr() for n, b in gen.model.named_buffers()}
    out = gen.generate([[1, 2, 3], list(range(10, 30))], max_new_tokens=40, return_ids=True)
    assert len(out[0]) == 40 and len(out[1]) == 40
    gen.score(list(range(3, 25)), list(range(40, 50)))
    assert len(_debug_get_cache_entry_list(Transformer.decode.__code__)) == 1
    assert len(_debug_get_cache_entry_list(rescore_layer.__code__)) == (1 if preset else 0)
    assert counter.frame_count == (2 if preset else 1), f"{counter.frame_count} frames compiled"
    assert {n: b.data_ptr() for n, b in gen.model.named_buffers()} == ptrs


def test_compiled_equals_eager():
    torch._dynamo.reset()
    eager = tiny_gen(method="zeromerge", kv_budget=12)
    comp = tiny_gen(method="zeromerge", kv_budget=12, compile="aot_eager")
    p, c = list(range(3, 20)), list(range(30, 66))
    torch.testing.assert_close(comp.score(p, c), eager.score(p, c), rtol=1e-5, atol=1e-5)


def test_prompt_too_long_is_refused():
    gen = tiny_gen(max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len 32"):
        gen.generate(list(range(30)), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="token #1"):
        gen.generate([1, 100000], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        gen.generate([[1], [2]], max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokenizer"):
        gen.generate("hello")


@pytest.mark.parametrize("bad", [-1, "vocab", True])
def test_prefill_refuses_ids_outside_the_vocabulary(bad):
    """Generator.prefill (public: benchmarks drive the decode step after it) checks every id on the host, as
    generate does, before anything runs: a negative id, one == vocab_size and a bool are each refused with an error
    naming the prompt, the position and the id, not a bare IndexError from the embedding (a device-side assert on
    CUDA). score checks its continuations the same way (they reach the decode step as a device tensor)."""
    gen = tiny_gen(max_batch_size=2)
    vocab = gen.args.vocab_size
    bad = vocab if bad == "vocab" else bad
    msg = rf"prompt #1 token #2 = {bad!r} is not a token id in \[0, {vocab}\)"
    with pytest.raises(ValueError, match=msg):
        gen.prefill([[1, 2, 3], [4, 5, bad, 6]])
    with pytest.raises(ValueError, match=msg):
        gen.generate([[1, 2, 3], [4, 5, bad, 6]], max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"continuation #0 token #1 = {bad!r} is not a token id in \[0, {vocab}\)"):
        gen.score([1, 2, 3], [4, bad])
    assert gen.pos.tolist() == [0, 0]  # refused before the prefill touched the generator
    (logits,) = gen.prefill([[1, 2, vocab - 1]])  # the largest id is fine
    assert logits.shape == (1, vocab) and gen.pos.tolist() == [3, 0]


def test_sampling_seeded_and_filtered():
    gen = tiny_gen()
    a = gen.generate([1, 2, 3], max_new_tokens=8, temperature=1.0, seed=3, return_ids=True)
    b = gen.generate([1, 2, 3], max_new_tokens=8, temperature=1.0, seed=3, return_ids=True)
    assert a == b
    # top_k=1 is greedy
    g = gen.generate([1, 2, 3], max_new_tokens=8, return_ids=True)
    assert gen.generate([1, 2, 3], max_new_tokens=8, temperature=0.7, top_k=1, seed=0, return_ids=True) == g
    assert gen.generate([1, 2, 3], max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=0, return_ids=True) == g


def test_max_seq_len_beyond_context_warns():
    with pytest.warns(UserWarning, match="context window"):
        tiny_gen(max_seq_len=300)


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="llama2-7b"):
        zmzoo.load("llama9-7b", weights="random")


def test_inductor_compiled_decode_matches_eager():
    """The default compile path (inductor on CPU) gives the eager logits, ZeroMerge cache, past the budget."""
    torch._dynamo.reset()
    comp = tiny_gen(method="zeromerge", kv_budget=12, compile=True)
    eager = tiny_gen(method="zeromerge", kv_budget=12)
    p, c = list(range(3, 20)), list(range(30, 70))
    torch.testing.assert_close(comp.score(p, c), eager.score(p, c), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,kw", [("zeromerge", {"kv_budget": 24}),
                                       ("zeromerge", {"kv_budget": 24, "preset": "paper-v2", "metric": "l2"}),
                                       ("zeromerge", {"kv_budget": 24, "preset": "retrieval"}),
                                       ("full", {}), ("h2o", {"kv_budget": 24}), ("snapkv", {"kv_budget": 24}),
                                       # the full cache's append inside the attention launch, under a sliding window
                                       ("full", {"name": "mistral-7b-v0.1", "args_overrides": {"sliding_window": 10}})])
def test_triton_generator_equals_torch(method, kw):
    """The whole generator through the Triton kernels (interpreted on CPU) computes what the plain-torch path computes,
    in fp32, with prompts longer than the budget (prefill compression) and shorter (append, then ring) in two batch
    rows: teacher-forced logits over 64 steps and every cache buffer afterwards (keys, values, weights, scores) within
    1e-4, greedy tokens equal up to the first near-tie."""
    from tests.conftest import assert_same_function

    torch._dynamo.reset()
    prompts = [list(range(3, 43)), [7, 1, 9, 4, 4, 2, 30, 31]]  # 40 tokens > budget 24; 8 < budget (append, then ring)
    gens = {o: tiny_gen(method=method, ops=o, max_batch_size=2, max_seq_len=128, **kw) for o in ("torch", "triton")}
    assert gens["triton"].model.caches[0].backend == "triton"
    assert_same_function(gens["torch"], gens["triton"], prompts, 64, rtol=1e-4, atol=1e-4, buffers=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU check: ZMZOO_TEST_DEVICE=cuda (bench/h200.sh runs it on the H200)")
@pytest.mark.parametrize("method,gemv", [("full", "torch"), ("zeromerge", "torch"), ("h2o", "torch"),
                                         ("zeromerge", "triton"), ("zeromerge", "auto")])
def test_cuda_graph_decode(method, gemv):
    """On CUDA the default compile (inductor, reduce-overhead: CUDA graphs) with the Triton kernels compiles the decode
    step once, records no CUDA-graph skip, keeps every buffer in place, and gives the eager torch-ops logits."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from tests.conftest import assert_same_function
    from zmzoo.models.transformer import Transformer

    torch._dynamo.reset()
    counters.clear()
    kw = {"kv_budget": 16} if method != "full" else {}
    gen = tiny_gen(method=method, compile=True, max_batch_size=2, ops="triton", **kw)
    gen.model.set_gemv(gemv)  # "triton": the decode step's products through zmzoo.ops.gemv (set before compiling)
    ref = tiny_gen(method=method, max_batch_size=2, ops="torch", **kw)
    ptrs = {n: b.data_ptr() for n, b in gen.model.named_buffers()}
    assert_same_function(ref, gen, [[1, 2, 3], list(range(10, 40))], 48, rtol=1e-4, atol=1e-4)
    # one graph of the decode step (the prompt's fused elementwise kernels, fused_prefill, compile graphs of their own)
    assert len(_debug_get_cache_entry_list(Transformer.decode.__code__)) == 1, dict(counters["stats"])
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert {n: b.data_ptr() for n, b in gen.model.named_buffers()} == ptrs


@pytest.mark.skipif(DEVICE != "cuda", reason="GPU check: ZMZOO_TEST_DEVICE=cuda (bench/h200.sh runs it on the H200)")
@pytest.mark.parametrize("kv_budget", [8, 24])  # 40-token prompts: the stash on the host (> 2 x budget), on the device
def test_cuda_lookahead_matches_torch_eager(kv_budget):
    """The retrieval preset on CUDA with the Triton ops and the compiled decode step (CUDA graphs): its draft runs
    through the captured step, its prompt stash goes to pinned host memory when it exceeds twice the cache and comes
    back for the rescore; teacher-forced logits and cache buffers equal the torch-reference eager run's."""
    from tests.conftest import assert_same_function

    torch._dynamo.reset()
    kw = dict(method="zeromerge", kv_budget=kv_budget, preset="retrieval", max_batch_size=2, max_seq_len=128)
    ref = tiny_gen(ops="torch", **kw)
    got = tiny_gen(compile=True, ops="triton", **kw)
    prompts = [list(range(3, 43)), list(range(50, 90))]
    assert_same_function(ref, got, prompts, 24, rtol=1e-4, atol=1e-4, buffers=True)


def test_long_prompt_chunking_is_exact():
    """Prefill bounds its memory on long prompts by rotating q/k and running the MLP a chunk of positions at a time;
    the chunked paths give the unchunked results (RoPE bit for bit, the MLP to GEMM rounding)."""
    from zmzoo.models.transformer import _rope, apply_rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 23, 3, 8, generator=g).transpose(1, 2)
    cos, sin = torch.randn(2, 1, 1, 23, 8, generator=g)
    assert torch.equal(apply_rope(x, cos, sin, chunk=5), _rope(x, cos, sin))
    gen = tiny_gen(max_seq_len=64)
    block = gen.model.layers[0]
    h = torch.randn(1, 23, gen.args.dim, generator=g)
    with torch.inference_mode():
        cos, sin = (t[:23].view(1, 1, 23, -1) for t in (gen.model.rope_cos, gen.model.rope_sin))
        whole = block.prefill(h, cos, sin, 0, mlp_chunk=4096)
        chunked = block.prefill(h, cos, sin, 0, mlp_chunk=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)  # GEMMs of other row counts round apart


@pytest.mark.parametrize("name", ["llama2-7b", "qwen3-0.6b"])  # qwen3: the per-head q/k norms fused as well
def test_fused_prefill_equals_eager(name):
    """The prompt's RMSNorm, RoPE and SiLU gate as compiled kernels (``PrefillKernels``, set by zmzoo.load on CUDA with
    compile on) give the eager prefill's logits at every position, for prompts of different lengths (one dynamic-shape
    compile serves them) and with the MLP in chunks; the compiled kernels did run (a counting backend sees each)."""
    from torch._dynamo.testing import CompileCounter

    from zmzoo.models.transformer import PrefillKernels

    torch._dynamo.reset()
    gen = tiny_gen(name=name, max_seq_len=96)
    model = gen.model
    counter = CompileCounter()
    kernels = PrefillKernels(backend=counter)
    g = torch.Generator().manual_seed(3)
    for t in (9, 41):
        ids = torch.randint(0, 128, (1, t), generator=g).to(DEVICE)
        with torch.inference_mode():
            model.set_prefill_kernels(None)
            want = model.prefill(ids, row=0, all_logits=True)
            model.set_prefill_kernels(kernels)
            got = model.prefill(ids, row=0, all_logits=True)
            block = model.layers[0]
            h = torch.randn(1, t, gen.args.dim, generator=g).to(DEVICE)
            cos, sin = (x[:t].view(1, 1, t, -1) for x in (model.rope_cos, model.rope_sin))
            chunked = block.prefill(h, cos, sin, 0, mlp_chunk=8, kern=kernels)
            whole = block.prefill(h, cos, sin, 0)
        model.set_prefill_kernels(None)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    # rms_norm, rope and silu_mul each compiled (a graph per input rank at most: qwen3's per-head norms are 4-D) and
    # run through the compiled graphs
    assert 3 <= counter.frame_count <= 8 and counter.op_count > 0


def test_two_generators_keep_their_own_state():
    """Process-wide state is gone: two models in one process have their own GEMV plans and tables and prefill
    kernels; with_cache shares the weights (same tensors) but not the caches, and both generators stay usable."""
    a = tiny_gen(method="zeromerge", kv_budget=12)
    b = tiny_gen(method="full")
    a.model.gemv_tuning["marker"] = None
    assert "marker" not in b.model.gemv_tuning
    c = a.with_cache("h2o", kv_budget=10)
    assert c.cache_config.method == "h2o" and a.cache_config.method == "zeromerge"
    assert c.model is not a.model and c.model.caches[0] is not a.model.caches[0]
    assert c.model.layers[0].attention.wqkv.data_ptr() == a.model.layers[0].attention.wqkv.data_ptr()
    assert c.model.tok_embeddings.weight is a.model.tok_embeddings.weight
    assert "marker" in c.model.gemv_tuning  # a copy of a's table, not the table itself
    c.model.gemv_tuning["other"] = None
    assert "other" not in a.model.gemv_tuning
    p, cont = list(range(3, 20)), list(range(30, 50))
    before = a.score(p, cont)
    c.score(p, cont)
    torch.testing.assert_close(a.score(p, cont), before, rtol=0, atol=0)  # a's caches untouched by c
    full = a.with_cache()  # no budget: the full cache on the same weights
    with torch.inference_mode():
        want = a.model.prefill(torch.tensor([p + cont]), row=0, all_logits=True)[0, len(p) - 1 : -1]
    torch.testing.assert_close(full.score(p, cont), want, rtol=1e-4, atol=1e-5)


def test_fused_projections_share_memory_with_their_parameters():
    """q|k|v and gate|up are single matrices whose rows are the named parameters themselves (no second copy)."""
    gen = tiny_gen(name="qwen2.5-0.5b")  # with q/k/v biases
    att, ff = gen.model.layers[0].attention, gen.model.layers[0].feed_forward
    for fused, parts in ((att.wqkv, (att.wq.weight, att.wk.weight, att.wv.weight)),
                         (att.bqkv, (att.wq.bias, att.wk.bias, att.wv.bias)),
                         (ff.w13, (ff.w1.weight, ff.w3.weight))):
        assert all(p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for p in parts)
        assert torch.equal(torch.cat(parts, 0), fused)


@pytest.mark.parametrize("kw,match", [
    ({"temperature": -1.0}, "temperature=-1.0 must be a finite number >= 0"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"temperature": float("inf")}, "temperature=inf"),
    ({"temperature": "hot"}, "temperature='hot'"),
    ({"top_p": 0.0}, r"top_p=0.0 must be None or a number in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_k": 0}, "top_k=0 must be None or a whole number >= 1"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be a whole number >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5"),
    ({"max_new_tokens": True}, "max_new_tokens=True"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"stop": ""}, "stop string"),
])
def test_generation_settings_are_checked(kw, match):
    """Every sampling and length setting outside its range is refused with an error naming it and what it allows,
    by generate and stream alike (nothing runs with a negative temperature or an empty nucleus)."""
    gen = tiny_gen()
    args = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        gen.generate([1, 2, 3], **args)
    gen.tokenizer = object()  # stream checks its settings before it tokenizes
    with pytest.raises(ValueError, match=match):
        next(iter(gen.stream([1, 2, 3], **args)))


def test_stream_pipelines_and_joins_to_generate():
    """stream() yields one piece per token as it comes (the next step queued before the last token is read back) and
    its pieces join to generate()'s text; a stop string cuts both the same way."""

    class Chars:  # a tokenizer whose token i is one character (no special handling)
        eos_ids: list[int] = []

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(65 + i % 26) for i in ids)

    gen = tiny_gen()
    gen.tokenizer = Chars()
    text = gen.generate([1, 2, 3], max_new_tokens=20)
    pieces = list(gen.stream([1, 2, 3], max_new_tokens=20))
    assert "".join(pieces) == text and len(text) == 20 and len(pieces) == 20
    stop = text[8:10]
    cut = gen.generate([1, 2, 3], max_new_tokens=20, stop=stop)
    assert cut == text[: text.find(stop)]
    assert "".join(gen.stream([1, 2, 3], max_new_tokens=20, stop=stop)) == cut
