"""``load``: name or path -> files -> config -> model -> weights -> caches -> Generator."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from zmzoo.cache import build_caches, resolve_cache_config
from zmzoo.generate import Generator
from zmzoo.models.config import ModelArgs
from zmzoo.models.transformer import Transformer
from zmzoo.ops import resolve_backend
from zmzoo.ops.gemv import BACKENDS, MAX_ROWS


def default_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """CUDA + bf16 when a GPU is present, else CPU + fp32 (each overridable)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(names)}")
        dt = names[dtype]
    else:
        dt = dtype
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dt} is not supported (float32, bfloat16, float16)")
    return dev, dt


def random_init_(model: Transformer, seed: int = 0) -> None:
    """Random weights (std 0.02 linear/embedding, ones for norms, zeros for biases), seeded, on the model's device."""
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _args_for_random(name_or_path: str) -> ModelArgs:
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelArgs.from_hf_config(json.loads((p / "config.json").read_text()), name=p.name)
    return ModelArgs.from_name(name_or_path)


def load(
    name_or_path: str,
    *,
    kv_ratio: float | None = None,
    kv_budget: int | None = None,
    method: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_seq_len: int | None = None,
    max_batch_size: int = 1,
    compile: bool | str = True,
    weights: str = "pretrained",
    ops: str = "auto",
    gemv: str = "auto",
    preset: str | None = None,
    seed: int = 0,
    args_overrides: dict[str, Any] | None = None,
    **cache_settings: Any,
) -> Generator:
    """Load a model and return a ready ``Generator`` with preallocated caches.

    Args:
        name_or_path: a zmzoo model name (``zmzoo.known_models()``), an HF hub repo id, a local directory with
            config.json + safetensors, or a ``.gguf`` file.
        kv_ratio / kv_budget: cache budget as a fraction of ``max_seq_len`` or a slot count; selects ZeroMerge
            unless ``method`` says otherwise. With neither (and no method), the full static cache is used.
        method: "full", "zeromerge", "h2o", "streaming" or "snapkv".
        device, dtype: default CUDA + bf16 when a GPU is present, else CPU + fp32.
        max_seq_len: longest prompt + generation (default: the model's context window).
        max_batch_size: rows decoded together (each prompt of a batch gets its own row).
        compile: ``torch.compile(fullgraph=True)`` the decode step (CUDA: with CUDA graphs); False for eager, or a
            backend name / callable.
        weights: "pretrained", or "random" to build the architecture with random weights (no download).
        ops: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        gemv: the decode step's weight products (``Transformer.set_gemv``): "auto" (on CUDA with the Triton ops, each
            product by ``zmzoo.ops.gemv``'s kernel, with its RMSNorm, SiLU gate or residual add inside (or the SiLU
            gate apart), where timing it on this GPU at load (~20-30 s for a 7B model) found it faster than cuBLAS
            with the elementwise work beside; else torch), "triton" (the kernel for every product) or "torch"
            (cuBLAS).
        preset: a named set of ZeroMerge settings (``zmzoo.cache.PRESETS``); explicit settings override it.
        **cache_settings: tail, dense, decay, logw_scale, metric, score_merge, score_window, score_pool, sinks.
    """
    dev, dt = default_device_dtype(device, dtype)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive whole number")
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights={weights!r} must be 'pretrained' or 'random'")
    backend = resolve_backend(ops, dev)
    if gemv not in BACKENDS:
        raise ValueError(f"gemv={gemv!r} is not one of {BACKENDS}")
    if gemv == "auto" and (dev.type != "cuda" or backend != "triton"):
        gemv = "torch"  # nothing to time: the interpreter's timings mean nothing, and without Triton there is no kernel
    if gemv == "triton" and dev.type != "cuda" and backend != "triton":
        raise RuntimeError("gemv='triton' on a CPU device runs the kernel in Triton's interpreter: pass ops='triton' "
                           "with TRITON_INTERPRET=1 set before Python starts")
    tokenizer = None
    state_dict = None
    if weights == "random":
        args = _args_for_random(name_or_path)
    else:
        from zmzoo.hub import resolve
        from zmzoo.tokenizer import Tokenizer

        res = resolve(name_or_path)
        if res.kind == "gguf":
            from zmzoo.models.weights import load_gguf

            args, state_dict, meta = load_gguf(res.path)
            tokenizer = Tokenizer.from_gguf_metadata(meta)
            if res.args is not None:
                args = args.replace(name=res.args.name, hf_repo=res.args.hf_repo)
        else:
            from zmzoo.models.weights import find_safetensors, load_safetensors_state_dict

            config = json.loads((Path(res.path) / "config.json").read_text())
            args = ModelArgs.from_hf_config(config, name=res.name)
            files = find_safetensors(Path(res.path))
            state_dict = load_safetensors_state_dict(files, args, dt, device=dev)
            tok_files = ("tokenizer.json", "tokenizer.model")
            if any((Path(res.path) / f).is_file() for f in tok_files):
                tokenizer = Tokenizer.from_dir(Path(res.path))
            else:
                warnings.warn(f"{res.path} has no tokenizer ({' or '.join(tok_files)}): pass token ids", stacklevel=2)
    if args_overrides:
        args = args.replace(**args_overrides)
    if max_seq_len is None:
        max_seq_len = args.max_position_embeddings
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be a whole number >= 2")
    if max_seq_len > args.max_position_embeddings:
        warnings.warn(
            f"max_seq_len {max_seq_len} exceeds {args.name}'s trained context window "
            f"({args.max_position_embeddings}); quality past it is not guaranteed",
            stacklevel=2,
        )
    cache_config = resolve_cache_config(max_seq_len=max_seq_len, method=method, kv_ratio=kv_ratio,
                                        kv_budget=kv_budget, preset=preset, **cache_settings)

    with torch.device("meta"):
        model = Transformer(args)
    if state_dict is None:
        model = model.to_empty(device=dev).to(dt)
        random_init_(model, seed)
        model.tie_weights()
    else:
        from zmzoo.models.weights import load_weights_into

        state_dict = {k: t.to(device=dev, dtype=dt) for k, t in state_dict.items()}
        load_weights_into(model, state_dict)
    model.eval().requires_grad_(False)
    model.fuse_projections()
    caches = build_caches(cache_config, n_layers=args.n_layers, batch_size=max_batch_size, n_heads=args.n_heads,
                          n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, max_seq_len=max_seq_len, dtype=dt,
                          device=dev, sliding_window=args.sliding_window, backend=backend)
    model.setup_caches(caches, max_seq_len)
    model.set_gemv(gemv, rows=(max_batch_size,) if max_batch_size <= MAX_ROWS else ())
    return Generator(model, tokenizer, args, cache_config, device=dev, dtype=dt, max_seq_len=max_seq_len,
                     max_batch_size=max_batch_size, compile=compile, backend=backend)
