"""Peers of zmzoo's decode step, timed the same way (``bench.timing.time_decode``) at the same shapes.

``hf_peer``: HF transformers' LlamaForCausalLM with the model's dimensions, random weights drawn as zmzoo's
``random_init_`` draws them, a ``StaticCache`` and ``torch.compile(model.forward, mode="reduce-overhead",
fullgraph=True)``. A peer that cannot run (transformers missing, another architecture) returns a record with
``ok: False`` and the reason.
"""

from __future__ import annotations

import inspect
import time
import traceback
from typing import Any

import torch

from bench.timing import free_memory, is_oom, peak_bytes, reset_peak, sync, time_decode


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
        kvb = ns.batch * 2 * args.n_layers * args.n_kv_heads * args.head_dim * item * max_seq_len
        rec.update(weight_bytes=wb, kv_bytes_per_step=kvb, bytes_per_step=wb + kvb,
                   roofline_tokens_per_s=ns.batch * ns.bandwidth / (wb + kvb))
        rec["pct_roofline"] = 100.0 * rec["tokens_per_s"] / rec["roofline_tokens_per_s"]
        rec["ok"] = True
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", oom=is_oom(e))
        if ns.verbose:
            traceback.print_exc()
    finally:
        model = cache = None
        free_memory(device)
    return rec
