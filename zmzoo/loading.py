"""``load``: name or path -> files -> config -> model -> weights -> caches -> Generator."""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zmzoo.cache import build_caches, resolve_cache_config
from zmzoo.generate import Generator
from zmzoo.models.config import ModelArgs
from zmzoo.models.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    check_divisible,
    quantize_transform,
    resolve_quantize,
)
from zmzoo.models.transformer import PrefillKernels, Transformer
from zmzoo.ops import resolve_backend
from zmzoo.ops.gemv import BACKENDS
from zmzoo.ops.qgemv_a8 import check_act_quant
from zmzoo.parallel import TensorParallel, resolve_tensor_parallel


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


@torch.no_grad()
def random_state_dict(model: Transformer, dtype: torch.dtype, device: torch.device, seed: int = 0,
                      transform: Callable | None = None, tp: TensorParallel | None = None) -> dict[str, Any]:
    """``random_init_``'s weights (the same values, drawn in the same order from the same generator) as a state dict,
    one tensor at a time, each passed through ``transform`` as soon as it exists (``quantize``: the device holds the
    quantized model plus one full-precision matrix, never the whole full-precision model). ``model`` may be on the
    meta device. With ``tp`` (``model`` then holds one rank's part), each weight is drawn whole and cut to the rank's
    part at once, so a sharded model has the unsharded one's weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, Any] = {}
    for name, p in model.named_parameters():
        part = tp.shard(name) if tp is not None else None
        shape = list(p.shape)
        if part is not None:
            shape[part.dim] = part.full
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
        if part is not None:
            t = part.of(t).clone()
        sd[name] = transform(name, t) if transform is not None else t
        del t
    return sd


def _args_for_random(name_or_path: str) -> ModelArgs:
    p = Path(name_or_path)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelArgs.from_hf_config(json.loads((p / "config.json").read_text()), name=p.name)
    return ModelArgs.from_name(name_or_path)


def describe_quantization(model: Transformer, mode: str | None, group: int | None) -> str | None:
    """What ``load`` quantized, in words: "int4 (group 64; LM head int8)", "GGUF Q4_1 x 210, Q8_0 x 1", or None."""
    if mode in ("int8", "int4"):
        return f"{mode}{f' (group {group})' if mode == 'int4' else ''}, LM head int8"
    kinds: dict[str, int] = {}
    for name, m in model.named_modules():
        skip = name.endswith((".wqkv", ".w13")) or (name == "output" and model.args.tie_embeddings)  # counted apart
        if isinstance(m, (QuantLinear, QuantEmbedding)) and not skip:
            kind = f"int{m.bits} group {m.group}" + (" with zero" if m.zero is not None else "")
            kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        return None
    return "kept as the GGUF stores them: " + ", ".join(f"{v} x {k}" for k, v in kinds.items())


def resolve_gemv(gemv: str, device: torch.device, backend: str) -> str:
    """The decode step's GEMV backend for ``gemv`` on ``device`` with the cache ops ``backend`` (see ``load``)."""
    if gemv not in BACKENDS:
        raise ValueError(f"gemv={gemv!r} is not one of {BACKENDS}")
    if gemv == "auto" and (device.type != "cuda" or backend != "triton"):
        return "torch"  # nothing to time: the interpreter's timings mean nothing, and without Triton there is no kernel
    if gemv == "triton" and device.type != "cuda" and backend != "triton":
        raise RuntimeError("gemv='triton' on a CPU device runs the kernel in Triton's interpreter: pass ops='triton' "
                           "with TRITON_INTERPRET=1 set before Python starts")
    return gemv


def resolve_act_quant(act_quant: str | None, mode: str | None) -> None:
    """``act_quant`` checked against the weights' quantization ``mode`` (see ``load``)."""
    check_act_quant(act_quant)
    if act_quant is not None and mode is None:
        raise ValueError(f"act_quant={act_quant!r} quantizes the activations of quantized weights' products, and these "
                         "weights load at full precision: pass quantize='int8' or 'int4' (or quantize='gguf' for a "
                         "Q8_0/Q4_0/Q4_1 GGUF file; 'auto' keeps a GGUF quantized on CUDA only)")


def resolve_compile(compile: bool | str | Callable, device: torch.device) -> bool | str | Callable:
    """``compile="auto"``: on CUDA, True (the decode step compiled and replayed as a CUDA graph); elsewhere False."""
    if compile == "auto":
        return device.type == "cuda"
    return compile


def make_generator(model: Transformer, tokenizer: Any, args: ModelArgs, *, device: torch.device, dtype: torch.dtype,
                   max_seq_len: int | None, max_batch_size: int, compile: bool | str | Callable, backend: str,
                   gemv: str, verbose: bool = False, act_quant: str | None = None, method: str | None = None,
                   kv_ratio: float | None = None,
                   kv_budget: int | None = None, preset: str | None = None, **cache_settings: Any) -> Generator:
    """Caches for ``model`` (which must hold none) and the Generator around it: what ``load`` does once the weights
    are in place, and ``Generator.with_cache`` on a shared copy of a loaded model."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive whole number")
    if max_seq_len is None:
        max_seq_len = args.max_position_embeddings
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be a whole number >= 2")
    if max_seq_len > args.max_position_embeddings:
        warnings.warn(
            f"max_seq_len {max_seq_len} exceeds {args.name}'s trained context window "
            f"({args.max_position_embeddings}); quality past it is not guaranteed",
            stacklevel=3,
        )
    compile = resolve_compile(compile, device)
    gemv = resolve_gemv(gemv, device, backend)
    cache_config = resolve_cache_config(max_seq_len=max_seq_len, method=method, kv_ratio=kv_ratio,
                                        kv_budget=kv_budget, preset=preset, **cache_settings)
    local = model.args  # a tensor-parallel rank's caches hold its heads (zmzoo.parallel)
    caches = build_caches(cache_config, n_layers=local.n_layers, batch_size=max_batch_size, n_heads=local.n_heads,
                          n_kv_heads=local.n_kv_heads, head_dim=local.head_dim, max_seq_len=max_seq_len, dtype=dtype,
                          device=device, sliding_window=local.sliding_window, backend=backend)
    model.setup_caches(caches, max_seq_len)
    model.set_quant_backend(backend)
    model.set_act_quant(act_quant)
    model.set_gemv(gemv, rows=(max_batch_size,))
    # the prompt's elementwise work in compiled kernels where compile is on and the GPU makes it pay (on the CPU the
    # prompt is bound by its matrix products, and a first prefill would wait for the compiler)
    if compile is True and device.type == "cuda":
        model.set_prefill_kernels(model.prefill_kernels or PrefillKernels())
    else:
        model.set_prefill_kernels(None)
    return Generator(model, tokenizer, args, cache_config, device=device, dtype=dtype, max_seq_len=max_seq_len,
                     max_batch_size=max_batch_size, compile=compile, backend=backend, gemv=gemv, verbose=verbose)


def _describe(gen: Generator, source: str, seconds: float) -> str:
    """The one line ``load`` prints: what was loaded, where, the cache, and what the first call will wait for."""
    seen, n_params = set(), 0
    for p in gen.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n_params += p.numel()
    for m in gen.model.modules():  # quantized layers: their weights' elements
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.q.data_ptr() not in seen:
            seen.add(m.q.data_ptr())
            n_params += m.q.numel() * (8 // m.bits)
    cfg = gen.cache_config
    if cfg.method == "full":
        cache = f"full cache ({gen.max_seq_len} positions)"
    else:
        cache = (f"{cfg.method} cache, {cfg.budget} slots per layer and KV head "
                 f"({100 * cfg.budget / gen.max_seq_len:.1f} % of max_seq_len {gen.max_seq_len})"
                 + (f", preset {cfg.preset!r}" if cfg.preset else ""))
    if gen.compile is False or gen.compile is None:
        step = "decode step eager"
    elif gen.device.type == "cuda":
        step = "decode step compiled on the first call (CUDA graph)"
    else:
        step = "decode step compiled on the first call (inductor)"
    if cfg.lookahead and not (gen.compile is False or gen.compile is None):
        step += ", the lookahead's rescore on the first prompt it compresses"
    dt = str(gen.dtype).replace("torch.", "")
    tp = gen.model.tp
    rank = " a rank" if tp is not None else ""
    weights = f"{gen.model.weight_nbytes()['weight_bytes'] / 2**30:.2f} GiB of weights{rank}"
    if gen.model.quantization:
        weights += f" ({gen.model.quantization})"
    where = f"on {gen.device}"
    if tp is not None:
        la = gen.model.args
        where = (f"tensor parallel over {tp.world} rank(s) (rank 0 on {gen.device}; each rank {la.n_heads} query "
                 f"heads, {la.n_kv_heads} KV head(s)"
                 + (f", each KV head on {tp.kv_replicas} ranks" if tp.kv_replicas > 1 else "")
                 + f", {la.intermediate_size} MLP columns)")
    return (f"[zmzoo] loaded {gen.args.name} ({n_params / 1e6:.0f}M parameters{rank}, {source}) {where} as {dt} "
            f"in {seconds:.1f} s; {weights}; {cache}; ops {gen.backend}; {step}")


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
    compile: bool | str | Callable = "auto",
    weights: str = "pretrained",
    ops: str = "auto",
    gemv: str = "auto",
    quantize: str | None = "auto",
    group_size: int | None = None,
    act_quant: str | None = None,
    preset: str | None = None,
    seed: int = 0,
    revision: str | None = None,
    token: str | bool | None = None,
    verbose: bool = True,
    args_overrides: dict[str, Any] | None = None,
    tp: Any = "auto",
    replicate_kv_heads: bool = True,
    **cache_settings: Any,
) -> Generator:
    """Load a model and return a ready ``Generator`` with preallocated caches.

    Args:
        name_or_path: a zmzoo model name (``zmzoo.known_models()``), an HF hub repo id, a local directory with
            config.json + safetensors, or a ``.gguf`` file.
        kv_ratio / kv_budget: cache budget as a fraction of ``max_seq_len`` or a slot count; selects ZeroMerge
            unless ``method`` says otherwise. With neither (and no method), the full static cache is used.
        method: "full", "zeromerge", "h2o", "streaming", "snapkv", "tova" or "knorm".
        device, dtype: default CUDA + bf16 when a GPU is present, else CPU + fp32.
        max_seq_len: longest prompt + generation (default: the model's context window).
        max_batch_size: rows decoded together (each prompt of a batch gets its own row).
        compile: "auto" (default): on CUDA, the decode step compiled with ``torch.compile(fullgraph=True)`` and
            replayed as one CUDA graph per token (the first call waits for the compiler), elsewhere eager. True
            compiles on any device (on a CPU with inductor), False runs eagerly, a backend name or callable compiles
            with that backend.
        weights: "pretrained", or "random" to build the architecture with random weights (no download).
        ops: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        gemv: the decode step's weight products (``Transformer.set_gemv``): "auto" (on CUDA with the Triton ops, each
            product by ``zmzoo.ops.gemv``'s kernel, with its RMSNorm, SiLU gate or residual add inside (or the SiLU
            gate apart), where timing it on this GPU at load (~20-30 s for a 7B model) found it faster than cuBLAS
            with the elementwise work beside; else torch), "triton" (the kernel for every product) or "torch"
            (cuBLAS). With quantized weights the kernel is ``zmzoo.ops.qgemv``'s (dequantizing in registers), and
            "torch" dequantizes every matrix at every step (a reference, not a fast path).
        quantize: weight-only quantization (docs/quantization.md). "auto" (default): on CUDA a GGUF file keeps its
            Q8_0, Q4_0 and Q4_1 tensors as they are (a file with tensors of other quantized types, K-quants, is
            dequantized as before, with a warning naming one); on a CPU (no kernel there) and for other checkpoints,
            full precision. None: full precision (a GGUF's tensors dequantized, as before). "int8": the block
            linears int8 per output channel. "int4": the block linears int4 per group of ``group_size`` columns
            (asymmetric, fp16 scale and zero). With "int8" and "int4" the LM head is int8 per channel, and a tied
            embedding with it; an untied embedding stays in ``dtype``. "gguf": a GGUF file's quantized tensors kept
            on any device, a tensor of another quantized type refused by name (an error for other checkpoints).
            Weights are quantized one tensor at a time as they are read (or drawn, with ``weights="random"``), so
            the full-precision model never exists on the device.
        group_size: int4 columns per scale: 32, 64 (default) or 128; it must divide every layer's in_features.
        act_quant: None (default), or "int8": the decode step's products by quantized weights also quantize their
            activations, to int8 per 32 columns (one fp32 scale each, round to nearest), and multiply integers
            (``zmzoo.ops.qgemv_a8``: W8A8 / W4A8, docs/quantization.md); the prompt's products stay weight-only.
            Needs quantized weights (``quantize`` "int8", "int4", or a GGUF kept quantized).
        preset: a named set of ZeroMerge settings (``zmzoo.cache.PRESETS``); explicit settings override them.
        seed: the seed of ``weights="random"``.
        revision, token: the hub revision (branch, tag or commit) and access token for hub downloads.
        verbose: show a progress bar while reading weights and print one line saying what was loaded (stderr).
        args_overrides: ModelArgs fields to replace (e.g. ``{"n_layers": 2}`` with random weights).
        tp: tensor parallelism (``zmzoo.parallel``, docs/tensor-parallel.md). "auto" (default): under torchrun
            (``WORLD_SIZE`` set) or with a default process group already initialised, the model is sharded over its
            ranks (the group initialised here if it is not: NCCL on CUDA, gloo on a CPU; each rank on
            ``cuda:LOCAL_RANK``), each rank reading only its part of the weights; otherwise one process holds it
            all. False: no sharding (each process loads the whole model). A ``torch.distributed.ProcessGroup``:
            sharded over that group. Only rank 0 prints.
        replicate_kv_heads: with more ranks than KV heads (a multiple of them), hold each KV head and its cache on
            world / n_kv_heads ranks (default); False refuses such a world size.
        **cache_settings: tail, dense, decay, logw_scale, metric, score_merge, score_window, score_pool, sinks,
            lookahead, lookahead_prompt_weight (``zmzoo.cache``: each validated, with an error naming it).
    """
    t0 = time.perf_counter()
    dev, dt = default_device_dtype(device, dtype)
    parallel, tpar = None, None
    placed = resolve_tensor_parallel(tp, dev)
    if placed is not None:
        tp_group, dev = placed
        parallel = functools.partial(TensorParallel, group=tp_group, replicate_kv_heads=replicate_kv_heads)
        verbose = verbose and dist.get_rank(tp_group) == 0
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive whole number")
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights={weights!r} must be 'pretrained' or 'random'")
    backend = resolve_backend(ops, dev)
    resolve_gemv(gemv, dev, backend)  # fail before reading any weights
    resolve_quantize(quantize, group_size, gguf=True)  # the value checks; which mode "auto" is waits for the files
    tokenizer = None
    state_dict = None
    spec = None
    if weights == "random":
        args = _args_for_random(name_or_path)
        source = "random weights"
        mode, group = resolve_quantize(quantize, group_size, gguf=False, device=dev)
        resolve_act_quant(act_quant, mode)
    else:
        from zmzoo.hub import resolve
        from zmzoo.tokenizer import Tokenizer

        res = resolve(name_or_path, revision=revision, token=token)
        mode, group = resolve_quantize(quantize, group_size, gguf=res.kind == "gguf", device=dev)
        resolve_act_quant(act_quant, mode)
        spec = QuantSpec(mode, group) if mode in ("int8", "int4") else None
        if res.kind == "gguf":
            from zmzoo.models.weights import load_gguf

            args, state_dict, meta = load_gguf(res.path, dtype=dt, device=dev, progress=verbose,
                                               quantize=("gguf" if quantize == "gguf" else "auto") if mode == "gguf"
                                               else spec, parallel=parallel)
            tokenizer = Tokenizer.from_gguf_metadata(meta)
            args = args.replace(name=res.name, hf_repo=res.args.hf_repo if res.args is not None else None)
            source = f"GGUF {res.path.name}"
        else:
            from zmzoo.models.weights import find_safetensors, load_safetensors_state_dict

            config = json.loads((Path(res.path) / "config.json").read_text())
            args = ModelArgs.from_hf_config(config, name=res.name)
            if mode == "int4":
                check_divisible(parallel(args).local_args() if parallel is not None else args, group)
            files = find_safetensors(Path(res.path))
            state_dict = load_safetensors_state_dict(files, args, dt, device=dev, progress=verbose, quantize=spec,
                                                     parallel=parallel)
            source = f"safetensors from {res.path}"
            tok_files = ("tokenizer.json", "tokenizer.model")
            if any((Path(res.path) / f).is_file() for f in tok_files):
                tokenizer = Tokenizer.from_dir(Path(res.path))
            else:
                warnings.warn(f"{res.path} has no tokenizer ({' or '.join(tok_files)}): pass token ids", stacklevel=2)
    if args_overrides:
        args = args.replace(**args_overrides)
    if parallel is not None:
        tpar = parallel(args)  # this rank's part (the checks of what divides: TensorParallelError)
    local = tpar.local_args() if tpar is not None else args

    with torch.device("meta"):
        model = Transformer(local)
    if state_dict is None and mode in ("int8", "int4"):
        if mode == "int4":
            check_divisible(local, group)
        spec = QuantSpec(mode, group)
        state_dict = random_state_dict(model, dt, dev, seed, quantize_transform(spec, args.tie_embeddings), tp=tpar)
    if state_dict is None and tpar is not None:  # drawn whole and cut: the unsharded model's weights
        state_dict = random_state_dict(model, dt, dev, seed, tp=tpar)
    if state_dict is None:
        model = model.to(dtype=dt).to_empty(device=dev)  # built in the target dtype: no fp32 copy of the model
        random_init_(model, seed)
        model.tie_weights()
    else:
        from zmzoo.models.weights import load_weights_into

        load_weights_into(model, state_dict, dtype=dt)  # errors name each tensor's file and its name there
        del state_dict
    model.eval().requires_grad_(False)
    model.set_tensor_parallel(tpar)
    model.fuse_projections()
    model.quantization = describe_quantization(model, mode, group)
    if act_quant is not None:
        model.quantization += f"; decode activations {act_quant} per 32 columns"
    gen = make_generator(model, tokenizer, args, device=dev, dtype=dt, max_seq_len=max_seq_len,
                         max_batch_size=max_batch_size, compile=compile, backend=backend, gemv=gemv,
                         verbose=verbose, act_quant=act_quant, method=method, kv_ratio=kv_ratio, kv_budget=kv_budget,
                         preset=preset,
                         **cache_settings)
    if verbose:
        print(_describe(gen, source, time.perf_counter() - t0), file=sys.stderr, flush=True)
    return gen
