"""ModelArgs and the table of named models.

Family differences are fields (``n_kv_heads``, ``qkv_bias``, ``qk_norm``, ``sliding_window``, ``rope_theta``,
``rope_scaling``, ``tie_embeddings``, ``head_dim``), never branches on a family name in the model code.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    name: str = "custom"
    hf_repo: str | None = None
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelArgs {self.name!r}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelArgs {self.name!r}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs {self.name!r}: head_dim {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.sliding_window = None
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"ModelArgs {self.name!r}: model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("n_layers", "n_heads", "dim", "vocab_size", "intermediate_size", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"ModelArgs {self.name!r}: {key} must be positive, got {getattr(self, key)}")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        """The named config (exact lookup), with fields replaced by ``overrides`` (e.g. ``n_layers=2``)."""
        key = name.lower()
        if key not in MODEL_TABLE:
            close = difflib.get_close_matches(key, MODEL_TABLE, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown model name {name!r}.{hint} Known names: {', '.join(sorted(MODEL_TABLE))}")
        return cls(**{**MODEL_TABLE[key], "name": key, **overrides})

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str = "custom", **overrides) -> ModelArgs:
        """Build from an HF ``config.json`` dict of model_type llama, mistral, qwen2 or qwen3."""
        mt = config.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json of {name!r} has model_type {mt!r}; zmzoo supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"config.json of {name!r} lacks {', '.join(missing)}")
        sliding = config.get("sliding_window")
        if mt == "qwen2" and not config.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window size but leave it off
        if mt == "qwen3" and not config.get("use_sliding_window", False):
            sliding = None
        rope_scaling = config.get("rope_scaling")
        rope_theta = config.get("rope_theta")
        rope_params = config.get("rope_parameters")  # transformers >= 5 layout
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if isinstance(rope_scaling, dict):
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = None if rtype == "default" else {**rope_scaling, "rope_type": rtype}
        if mt == "qwen2":
            qkv_bias = True
        else:
            qkv_bias = bool(config.get("attention_bias", False))
        n_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
        kw = dict(
            name=name,
            model_type=mt,
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=config.get("intermediate_size", 4 * config["hidden_size"]),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            sliding_window=sliding,
            qkv_bias=qkv_bias,
            qk_norm=(mt == "qwen3"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )
        if config.get("mlp_bias"):
            raise ValueError(f"config.json of {name!r}: mlp_bias=True is not supported")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json of {name!r}: hidden_act {act!r} is not supported (only silu)")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for this model (used by tests to write tiny checkpoints)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        cfg = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type == "llama":
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = False
        if self.model_type == "qwen2":
            cfg["use_sliding_window"] = False
        if self.model_type == "qwen3":
            cfg["attention_bias"] = self.qkv_bias
            cfg["use_sliding_window"] = False
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = self.eos_token_id
        return cfg

    def replace(self, **changes) -> ModelArgs:
        return dataclasses.replace(self, **changes)


def _llama2(dim, n_layers, n_heads, inter, n_kv_heads=None):
    return dict(model_type="llama", vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, intermediate_size=inter, norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def _mistral(vocab, theta, window):
    return dict(model_type="mistral", vocab_size=vocab, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                intermediate_size=14336, norm_eps=1e-5, rope_theta=theta, max_position_embeddings=32768,
                sliding_window=window, bos_token_id=1, eos_token_id=2)


def _qwen2(vocab, dim, n_layers, n_heads, n_kv_heads, inter, tie, ctx=32768):
    return dict(model_type="qwen2", vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, intermediate_size=inter, norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=ctx, qkv_bias=True, tie_embeddings=tie, eos_token_id=151643)


def _qwen3(dim, n_layers, n_heads, n_kv_heads, inter, tie):
    return dict(model_type="qwen3", vocab_size=151936, dim=dim, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, head_dim=128, intermediate_size=inter, norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=40960, qk_norm=True, tie_embeddings=tie, eos_token_id=151645)


def _smollm2(dim, n_layers, n_heads, n_kv_heads, inter, theta):
    return dict(model_type="llama", vocab_size=49152, dim=dim, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, intermediate_size=inter, norm_eps=1e-5, rope_theta=theta,
                max_position_embeddings=8192, tie_embeddings=True, bos_token_id=1, eos_token_id=2)


def _entries():
    t: dict[str, dict[str, Any]] = {}

    def add(name, repo, cfg):
        t[name] = {**cfg, "hf_repo": repo}

    # meta-llama/Llama-2-{7,13,70}b-hf config.json (70B uses GQA with 8 KV heads)
    for size, cfg in (("7b", _llama2(4096, 32, 32, 11008)), ("13b", _llama2(5120, 40, 40, 13824)),
                      ("70b", _llama2(8192, 80, 64, 28672, n_kv_heads=8))):
        add(f"llama2-{size}", f"meta-llama/Llama-2-{size}-hf", cfg)
        add(f"llama2-{size}-chat", f"meta-llama/Llama-2-{size}-chat-hf", cfg)
    # mistralai/Mistral-7B-v0.1 config.json: sliding_window 4096, rope_theta 1e4
    add("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", _mistral(32000, 10000.0, 4096))
    add("mistral-7b-instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", _mistral(32000, 10000.0, 4096))
    # mistralai/Mistral-7B-Instruct-v0.2 config.json: sliding_window null, rope_theta 1e6
    add("mistral-7b-instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", _mistral(32000, 1e6, None))
    # mistralai/Mistral-7B-v0.3 config.json: vocab 32768, no window, rope_theta 1e6
    add("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", _mistral(32768, 1e6, None))
    add("mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", _mistral(32768, 1e6, None))
    # Qwen/Qwen2.5-*: q/k/v bias, rope_theta 1e6, tied embeddings up to 3B
    for size, cfg in (("0.5b", _qwen2(151936, 896, 24, 14, 2, 4864, True)),
                      ("1.5b", _qwen2(151936, 1536, 28, 12, 2, 8960, True)),
                      ("3b", _qwen2(151936, 2048, 36, 16, 2, 11008, True)),
                      ("7b", _qwen2(152064, 3584, 28, 28, 4, 18944, False)),
                      ("72b", _qwen2(152064, 8192, 80, 64, 8, 29568, False))):
        add(f"qwen2.5-{size}", f"Qwen/Qwen2.5-{size.upper()}", cfg)
        add(f"qwen2.5-{size}-instruct", f"Qwen/Qwen2.5-{size.upper()}-Instruct", cfg)
    # Qwen/Qwen3-*: per-head q/k RMSNorm, head_dim 128, tied embeddings up to 4B
    for size, cfg in (("0.6b", _qwen3(1024, 28, 16, 8, 3072, True)), ("1.7b", _qwen3(2048, 28, 16, 8, 6144, True)),
                      ("4b", _qwen3(2560, 36, 32, 8, 9728, True)), ("8b", _qwen3(4096, 36, 32, 8, 12288, False))):
        add(f"qwen3-{size}", f"Qwen/Qwen3-{size.upper()}", cfg)
        add(f"qwen3-{size}-base", f"Qwen/Qwen3-{size.upper()}-Base", cfg)
    # HuggingFaceTB/SmolLM2-*: LLaMA architecture, tied embeddings, 8K context
    for size, cfg in (("135m", _smollm2(576, 30, 9, 3, 1536, 100000.0)),
                      ("360m", _smollm2(960, 32, 15, 5, 2560, 100000.0)),
                      ("1.7b", _smollm2(2048, 24, 32, 32, 8192, 130000.0))):
        repo = f"HuggingFaceTB/SmolLM2-{size.upper()}"
        add(f"smollm2-{size}-base", repo, cfg)
        add(f"smollm2-{size}", repo + "-Instruct", cfg)
        add(f"smollm2-{size}-instruct", repo + "-Instruct", cfg)
    return t


MODEL_TABLE: dict[str, dict[str, Any]] = _entries()


def known_names() -> list[str]:
    return sorted(MODEL_TABLE)
