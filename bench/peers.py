"""Peers of zmzoo's decode step, timed the same way (``bench.timing.time_decode``) at the same shapes.

``hf_peer``: HF transformers' LlamaForCausalLM with the model's dimensions, random weights drawn as zmzoo's
``random_init_`` draws them, a ``StaticCache`` and ``torch.compile(model.forward, mode="reduce-overhead",
fullgraph=True)``. A peer that cannot run (transformers missing, another architecture) returns a record with
``ok: False`` and the reason.

``gptfast_peer``: gpt-fast (github.com/meta-pytorch/gpt-fast) as it decodes: its ``Transformer`` with the model's
dimensions and random weights drawn the same way, weight-only int8 or int4 by its own quant handlers, its ``prefill``
and its ``decode_one_token`` (sampling included, generate.py's defaults) compiled as its generate.py compiles it. Its
code is never part of this repository: ``gptfast_modules`` executes it from the ignored ``.peers/gpt-fast`` folder
that ``scripts/fetch_peers.sh`` fills (carry that folder to a machine without network); a record with ``ok: False``
says so when the folder is absent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import sys
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.timing import free_memory, is_oom, peak_bytes, reset_peak, sync, time_decode


def add_roofline(rec: dict[str, Any], ns, args, item: int, weight_bytes: int, attended: int) -> None:
    """A peer's bytes a step (its weights as stored, the KV of ``attended`` positions) and its roofline, into ``rec``,
    which it marks ok."""
    kvb = ns.batch * 2 * args.n_layers * args.n_kv_heads * args.head_dim * item * attended
    rec.update(weight_bytes=weight_bytes, kv_bytes_per_step=kvb, bytes_per_step=weight_bytes + kvb,
               roofline_tokens_per_s=ns.batch * ns.bandwidth / (weight_bytes + kvb))
    rec["pct_roofline"] = 100.0 * rec["tokens_per_s"] / rec["roofline_tokens_per_s"]
    rec["ok"] = True


def hf_peer(args, ns, device, dtype, context: int, steps: int, repeats: int) -> dict[str, Any]:
    """HF transformers LlamaForCausalLM + StaticCache + compiled forward, the same shape and timing as zmzoo."""
    rec: dict[str, Any] = {"peer": "hf-static", "method": "hf-static", "context": context, "batch": ns.batch}
    model = cache = None
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

        rec["transformers"] = transformers.__version__
        if args.model_type != "llama" or args.qkv_bias or args.qk_norm:
            raise RuntimeError(f"the HF peer builds LlamaForCausalLM; {args.name} is {args.model_type}")
        new_tokens = 1 + ns.warmup + steps * repeats + 1
        max_seq_len = context + new_tokens
        cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                          num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                          num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                          max_position_embeddings=max(max_seq_len, args.max_position_embeddings),
                          rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                          tie_word_embeddings=args.tie_embeddings)
        cfg._attn_implementation = "sdpa"
        free_memory(device)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
        model.eval().requires_grad_(False)
        g = torch.Generator(device=device).manual_seed(ns.seed)
        for name, p in model.named_parameters():  # zmzoo's random_init_ scheme
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=g)
        model.generation_config.cache_implementation = "static"
        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        use_cache_position = "cache_position" in params
        sc_params = inspect.signature(StaticCache.__init__).parameters
        sc_kw: dict[str, Any] = {"config": cfg, "max_cache_len": max_seq_len}
        for k, v in (("max_batch_size", ns.batch), ("batch_size", ns.batch), ("device", device), ("dtype", dtype)):
            if k in sc_params:
                sc_kw[k] = v
        cache = StaticCache(**sc_kw)
        gen_ids = torch.Generator().manual_seed(ns.seed)
        ids = torch.randint(0, args.vocab_size, (ns.batch, context), generator=gen_ids).to(device)
        reset_peak(device)
        chunk = ns.hf_prefill_chunk
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            out = None
            for a in range(0, context, chunk):
                b = min(context, a + chunk)
                positions = torch.arange(a, b, device=device)
                kw: dict[str, Any] = {cache_kw: cache, "use_cache": True,
                                      "position_ids": positions.unsqueeze(0).expand(ns.batch, -1)}
                if use_cache_position:
                    kw["cache_position"] = positions
                if "logits_to_keep" in params:
                    kw["logits_to_keep"] = 1
                out = model(input_ids=ids[:, a:b], **kw)
            tok = out.logits[:, -1].argmax(-1)
            sync(device)
            rec["prefill_s"] = time.perf_counter() - t0
        rec["prefill_peak_bytes"] = peak_bytes(device)
        rec["prefill_chunk"] = chunk
        fwd = model.forward
        if ns.compile != "none":
            if ns.compile == "auto":
                mode = "reduce-overhead" if device.type == "cuda" else None
                fwd = torch.compile(model.forward, mode=mode, fullgraph=True)
            else:
                fwd = torch.compile(model.forward, fullgraph=True, backend=ns.compile)
        with torch.inference_mode():
            pos = torch.full((ns.batch,), context, dtype=torch.int64, device=device)

        def step(tok: torch.Tensor, pos: torch.Tensor, hf_cache=cache) -> torch.Tensor:
            kw: dict[str, Any] = {cache_kw: hf_cache, "use_cache": True, "position_ids": pos.view(-1, 1)}
            if use_cache_position:
                kw["cache_position"] = pos[:1]
            return fwd(input_ids=tok.view(-1, 1), **kw).logits[:, -1].clone()

        reset_peak(device)
        t = time_decode(step, pos, tok, device, steps, repeats, ns.warmup)
        rec.update(decode_peak_bytes=peak_bytes(device), compile_s=t["first_call_s"], step_s=t["step_s_median"],
                   step_s_all=t["step_s_all"], steps=steps, repeats=repeats, warmup=ns.warmup,
                   max_seq_len=max_seq_len, tokens_per_s=ns.batch / t["step_s_median"])
        item = torch.empty((), dtype=dtype).element_size()
        wb = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
        if not args.tie_embeddings:
            wb -= model.model.embed_tokens.weight.numel() * item
        # HF's SDPA over a static cache reads all max_cache_len slots (masked), not only the filled ones
        add_roofline(rec, ns, args, item, wb, max_seq_len)
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", oom=is_oom(e))
        if ns.verbose:
            traceback.print_exc()
    finally:
        model = cache = None
        free_memory(device)
    return rec


# ---------------------------------------------------------------------------------------------------- gpt-fast
ROOT = Path(__file__).resolve().parents[1]
GPTFAST_DIR = ROOT / ".peers" / "gpt-fast"
# gpt-fast's files import each other by these top-level names (`from model import Transformer`)
GPTFAST_MODULES = ("model", "tokenizer", "quantize", "generate")
# generate.py's defaults (--temperature 0.8 --top_k 200): decode_one_token samples, and the peer keeps its sampling
GPTFAST_SAMPLING = {"temperature": 0.8, "top_k": 200}
# the inductor settings generate.py sets when imported; put back afterwards, so that later compiles are unaffected
_GPTFAST_CONFIGS = (("_inductor", "coordinate_descent_tuning"), ("_inductor", "triton.unique_kernel_names"),
                    ("_inductor", "fx_graph_cache"), ("_functorch", "enable_autograd_cache"))


def _config_get(mod: str, key: str) -> Any:
    obj = getattr(torch, mod).config
    *parents, leaf = key.split(".")
    for k in parents:
        obj = getattr(obj, k)
    return obj, leaf


def _exec_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


@contextlib.contextmanager
def gptfast_modules(folder: Path | str | None = None) -> Iterator[types.SimpleNamespace]:
    """gpt-fast's ``model``, ``quantize`` and ``generate`` executed from ``folder`` (default ``.peers/gpt-fast`` in
    the checkout) under their own top-level names in ``sys.modules``, where their imports of each other find them;
    on exit the names' previous modules and the inductor settings generate.py changes are put back. ``tokenizer`` is
    gpt-fast's when its imports (sentencepiece, tiktoken) are installed, else a stub that raises if called: the peer
    feeds token ids and never tokenizes. (generate.py appends the folder's parent to the module search path itself.)
    Raises FileNotFoundError naming the folder and scripts/fetch_peers.sh when it lacks gpt-fast's files."""
    folder = Path(folder) if folder is not None else GPTFAST_DIR
    missing = [f for f in ("model.py", "quantize.py", "generate.py") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"gpt-fast is not in {folder} (no {', '.join(missing)}): run scripts/fetch_peers.sh "
                                f"there (and carry .peers/gpt-fast to a machine without network)")
    saved = {n: sys.modules.pop(n) for n in GPTFAST_MODULES if n in sys.modules}
    configs = [(*_config_get(m, k),) for m, k in _GPTFAST_CONFIGS]
    values = [getattr(obj, leaf) for obj, leaf in configs]
    try:
        ns = types.SimpleNamespace(folder=str(folder), tokenizer_stub=None)
        ns.model = _exec_module("model", folder / "model.py")
        try:
            ns.tokenizer = _exec_module("tokenizer", folder / "tokenizer.py")
        except (ImportError, FileNotFoundError) as e:
            ns.tokenizer_stub = f"{type(e).__name__}: {e}"
            ns.tokenizer = types.ModuleType("tokenizer")

            def get_tokenizer(*_a, **_k):
                raise RuntimeError(f"gpt-fast's tokenizer did not import ({ns.tokenizer_stub}); the peer needs none")

            ns.tokenizer.get_tokenizer = get_tokenizer
            sys.modules["tokenizer"] = ns.tokenizer
        ns.quantize = _exec_module("quantize", folder / "quantize.py")
        ns.generate = _exec_module("generate", folder / "generate.py")
        commit = folder / "COMMIT"  # scripts/fetch_peers.sh: "<commit> <source>"
        ns.commit = commit.read_text().split()[0] if commit.is_file() else None
        ns.source = " ".join(commit.read_text().split()[1:]) if commit.is_file() else None
        yield ns
    finally:
        for n in GPTFAST_MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        for (obj, leaf), v in zip(configs, values):
            setattr(obj, leaf, v)


def gptfast_label(dtype: torch.dtype, quantize: str | None, groupsize: int) -> str:
    if quantize == "int8":
        return "gpt-fast-int8"
    if quantize == "int4":
        return f"gpt-fast-int4-g{groupsize}"
    return "gpt-fast-" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _int4_pack_uint8(gf: types.SimpleNamespace):
    """gpt-fast's ``prepare_int4_weight_and_scales_and_zeros`` for torch >= 2.5, whose
    ``_convert_weight_to_int4pack`` takes the 4-bit values packed in pairs as ``[n][k / 2]`` uint8 (gpt-fast main
    passes ``[n][k]`` int32: meta-pytorch/gpt-fast#217). The values, scales and zeros are gpt-fast's
    ``group_quantize_tensor``'s; the pairs are packed as torch's own int4 tests pack them (high nibble first)."""
    def prepare(weight_bf16, groupsize, inner_k_tiles):
        w_int32, scales_and_zeros = gf.quantize.group_quantize_tensor(weight_bf16, n_bit=4, groupsize=groupsize)
        w_uint8 = (w_int32[:, ::2] << 4 | w_int32[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(w_uint8, inner_k_tiles), scales_and_zeros

    return prepare


@torch.no_grad()
def _int4_check(gf: types.SimpleNamespace, model: torch.nn.Module, sd: dict[str, torch.Tensor], groupsize: int,
                inner_k_tiles: int, device: torch.device, rec: dict[str, Any]) -> None:
    """The first linear's int4 pack through gpt-fast's ``linear_forward_int4`` against the full-precision product on 4
    random rows: 4-bit groups of normal weights give a relative error near 0.1; mispacked nibbles give one near 1.4
    (raised as an error). Recorded as ``int4_check_rel_err``."""
    fqn, lin = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    if not gf.quantize._check_linear_int4_k(lin.in_features, groupsize, inner_k_tiles):
        return  # padded: gpt-fast's layer pads its input, the check would have to as well
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(4, lin.in_features, generator=g, device=device).to(torch.bfloat16)
    ref = x.float() @ lin.weight.float().T
    got = gf.quantize.linear_forward_int4(x, sd[f"{fqn}.weight"].to(device), sd[f"{fqn}.scales_and_zeros"].to(device),
                                          lin.out_features, groupsize).float()
    err = ((got - ref).norm() / ref.norm()).item()
    rec["int4_check_rel_err"] = err
    if not err < 0.5:
        raise RuntimeError(f"gpt-fast's int4 {fqn} does not reproduce its weights (relative error {err:.3f} on random "
                           f"inputs; {rec.get('int4_pack')})")


def gptfast_quantize_(gf: types.SimpleNamespace, model: torch.nn.Module, quantize: str | None, groupsize: int,
                      device: torch.device, rec: dict[str, Any], verbose: bool = False) -> torch.nn.Module:
    """gpt-fast's weight-only quantization of ``model`` in place, as its quantize.py + generate.py's ``_load_model``
    do it: the handler's ``create_quantized_state_dict``, ``convert_for_runtime`` on the meta device, then
    ``load_state_dict(..., assign=True)``. int4 on CPU raises: gpt-fast calls ``_convert_weight_to_int4pack`` and
    ``_weight_int4pack_mm``, which have no CPU kernels (CPU has only the ``_for_cpu`` variants)."""
    if quantize is None:
        return model
    cuda = device.type == "cuda"
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())  # a line per linear
    if quantize == "int8":
        handler = gf.quantize.WeightOnlyInt8QuantHandler(model)
        with quiet:
            sd = handler.create_quantized_state_dict()
    elif quantize == "int4":
        handler = gf.quantize.WeightOnlyInt4QuantHandler(model, groupsize)
        try:
            with quiet:
                sd = handler.create_quantized_state_dict(use_cuda=cuda)
            rec["int4_pack"] = "gpt-fast's (int32 [n][k])"
        except (RuntimeError, NotImplementedError) as e:
            if not cuda:
                raise RuntimeError(
                    f"gpt-fast's int4 cannot run on {device.type}: it calls torch.ops.aten._convert_weight_to_int4pack "
                    f"and _weight_int4pack_mm, which have no CPU kernels in torch {torch.__version__} (CPU has only "
                    f"_convert_weight_to_int4pack_for_cpu / _weight_int4pack_mm_for_cpu, which gpt-fast does not "
                    f"call): {type(e).__name__}: {str(e)[:120]}") from e
            rec["int4_gptfast_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rec["int4_pack"] = ("uint8 [n][k/2] (bench.peers._int4_pack_uint8: torch >= 2.5's input of "
                                "_convert_weight_to_int4pack; gpt-fast's own int32 call failed, gpt-fast#217)")
            gf.quantize.prepare_int4_weight_and_scales_and_zeros = _int4_pack_uint8(gf)
            with quiet:
                sd = handler.create_quantized_state_dict(use_cuda=cuda)
        _int4_check(gf, model, sd, groupsize, handler.inner_k_tiles, device, rec)
    else:
        raise ValueError(f"gpt-fast's weight-only quantizations are int8 and int4, not {quantize!r}")
    with torch.device("meta"):
        model = handler.convert_for_runtime()
    model.load_state_dict(sd, assign=True)
    return model


def gptfast_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one gpt-fast decode step reads: every parameter and buffer as stored (int8 weights and
    scales, int4 packs and scales_and_zeros) but the embedding table (one row read per step; its output projection is
    separate) and the KV caches, each tensor once."""
    seen: dict[int, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("tok_embeddings.") or "kv_cache." in name:
            continue
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def gptfast_peer(args, ns, device, dtype, context: int, steps: int, repeats: int, quantize: str | None = None,
                 groupsize: int = 64, folder: Path | str | None = None) -> dict[str, Any]:
    """gpt-fast's Transformer (bf16, or weight-only int8 / int4 with ``groupsize`` columns per scale) at zmzoo's
    dimensions: its prefill (in chunks of ``ns.gptfast_prefill_chunk``, default 1024: gpt-fast's uncompiled prefill
    materializes the scores of each chunk) and its ``decode_one_token`` compiled as generate.py compiles it
    (``torch.compile(mode="reduce-overhead", fullgraph=True)``) on CUDA with ``--compile auto``, eager on CPU
    (``--compile none``: eager everywhere; a backend name: ``torch.compile(fullgraph=True, backend=...)``), timed by
    ``time_decode`` as ``hf_peer`` is. Each step clones the probabilities as gpt-fast's ``decode_n_tokens`` does;
    the next token fed is their argmax. A record with ``ok: False`` and the reason when it cannot run."""
    label = gptfast_label(dtype, quantize, groupsize)
    rec: dict[str, Any] = {"peer": label, "method": label, "context": context, "batch": ns.batch,
                           "quantize": quantize, "group_size": groupsize if quantize == "int4" else None,
                           "sampling": dict(GPTFAST_SAMPLING)}
    model = None
    try:
        with gptfast_modules(folder) as gf:
            rec.update(gpt_fast=gf.commit, gpt_fast_source=gf.source, gpt_fast_dir=gf.folder)
            if gf.tokenizer_stub:
                rec["gpt_fast_tokenizer"] = f"stub ({gf.tokenizer_stub})"
            if args.model_type != "llama" or args.qkv_bias or args.qk_norm or args.sliding_window is not None:
                raise RuntimeError(f"gpt-fast's Transformer is a LLaMA without biases, QK norms or sliding windows; "
                                   f"{args.name} is {args.model_type}")
            if args.n_heads * args.head_dim != args.dim:
                raise RuntimeError(f"gpt-fast's ModelArgs sets head_dim = dim // n_head; {args.name} has head_dim "
                                   f"{args.head_dim} with dim {args.dim} and {args.n_heads} heads")
            if quantize == "int4" and dtype != torch.bfloat16:
                raise RuntimeError(f"gpt-fast's int4 layer runs in bf16 (bf16 scales_and_zeros, input cast to bf16), "
                                   f"not {dtype}: --dtype bf16")
            new_tokens = 1 + ns.warmup + steps * repeats + 1
            max_seq_len = context + new_tokens
            rope_scaling = None
            if args.rope_scaling and args.rope_scaling.get("rope_type") == "llama3":
                rope_scaling = {k: args.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                   "original_max_position_embeddings")}
            elif args.rope_scaling:
                rec["rope_scaling"] = f"not applied (speed-neutral): {args.rope_scaling}"
            cfg = gf.model.ModelArgs(
                block_size=gf.model.find_multiple(max_seq_len, 8), vocab_size=args.vocab_size, n_layer=args.n_layers,
                n_head=args.n_heads, dim=args.dim, intermediate_size=args.intermediate_size,
                n_local_heads=args.n_kv_heads, head_dim=args.head_dim, rope_base=args.rope_theta,
                norm_eps=args.norm_eps, rope_scaling=rope_scaling)
            if args.tie_embeddings:
                rec["tie_embeddings"] = "built untied (gpt-fast's output is its own Linear): the same bytes per step"
            free_memory(device)
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device("meta"):
                    model = gf.model.Transformer(cfg)
            finally:
                torch.set_default_dtype(default)
            model = model.to_empty(device=device)
            g = torch.Generator(device=device).manual_seed(ns.seed)
            with torch.no_grad():
                for name, p in model.named_parameters():  # zmzoo's random_init_ scheme
                    if name.endswith("norm.weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, 0.02, generator=g)
            model = gptfast_quantize_(gf, model, quantize, groupsize, device, rec, verbose=ns.verbose)
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)  # as _load_model ends
            with torch.device(device):
                model.setup_caches(max_batch_size=ns.batch, max_seq_length=max_seq_len)
            gen = gf.generate
            flex = "block_mask" in inspect.signature(gen.decode_one_token).parameters  # main since 2024-12
            rec["attention"] = "flex_attention (decode reads the filled blocks)" if flex else "sdpa (every slot)"
            gen_ids = torch.Generator().manual_seed(ns.seed)
            ids = torch.randint(0, args.vocab_size, (ns.batch, context), generator=gen_ids).to(device)
            chunk = getattr(ns, "gptfast_prefill_chunk", None) or 1024
            reset_peak(device)
            with torch.inference_mode():
                sync(device)
                t0 = time.perf_counter()
                for a in range(0, context, chunk):
                    b = min(context, a + chunk)
                    tok = gen.prefill(model, ids[:, a:b], torch.arange(a, b, device=device), **GPTFAST_SAMPLING)
                sync(device)
                rec["prefill_s"] = time.perf_counter() - t0
            rec["prefill_peak_bytes"] = peak_bytes(device)
            rec["prefill_chunk"] = chunk
            decode = gen.decode_one_token
            if ns.compile == "auto" and device.type == "cuda":
                decode = torch.compile(decode, mode="reduce-overhead", fullgraph=True)  # as generate.py's main
                rec["compile"] = 'torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)'
            elif ns.compile not in ("auto", "none"):
                decode = torch.compile(decode, fullgraph=True, backend=ns.compile)
                rec["compile"] = f"torch.compile(decode_one_token, fullgraph=True, backend={ns.compile!r})"
            else:
                rec["compile"] = "eager"
            extra: tuple = ()
            if flex:  # decode_n_tokens's mask, made once
                with torch.inference_mode():
                    extra = (gen.create_block_mask(gen.causal_mask, 1, 1, model.max_seq_length, model.max_seq_length,
                                                   device=device),)
            with torch.inference_mode():
                pos = torch.tensor([context], device=device, dtype=torch.int)  # generate's input_pos
                tok = tok.view(ns.batch).long()

            def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                _, probs = decode(model, tok.view(ns.batch, -1), pos, *extra, **GPTFAST_SAMPLING)
                return probs.clone()

            reset_peak(device)
            t = time_decode(step, pos, tok, device, steps, repeats, ns.warmup)
            rec.update(decode_peak_bytes=peak_bytes(device), compile_s=t["first_call_s"], step_s=t["step_s_median"],
                       step_s_all=t["step_s_all"], steps=steps, repeats=repeats, warmup=ns.warmup,
                       max_seq_len=max_seq_len, cache_slots=model.max_seq_length,
                       tokens_per_s=ns.batch / t["step_s_median"])
            wb = gptfast_weight_bytes(model)
            item = torch.empty((), dtype=dtype).element_size()
            # flex decoding skips the mask's empty blocks: the tokens attended on average while timed, as zmzoo's
            # rows count them; SDPA over the static cache reads every slot (masked), as HF's does
            attended = context + 1 + ns.warmup + steps * repeats // 2 if flex else model.max_seq_length
            add_roofline(rec, ns, args, item, wb, attended)
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}", oom=is_oom(e))
        if ns.verbose:
            traceback.print_exc()
    finally:
        model = None
        free_memory(device)
    return rec
