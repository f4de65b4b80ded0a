"""One tokenizer interface over ``tokenizer.json`` (the ``tokenizers`` library), ``tokenizer.model`` (sentencepiece)
and the vocabulary a GGUF file carries in its metadata.

Chat templates are rendered as HF transformers does: a sandboxed jinja2 environment with ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, and the special tokens
(``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# GGUF token types (llama.cpp ``LLAMA_TOKEN_TYPE_*``)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of llama.cpp's pre-tokenizer types (``tokenizer.ggml.pre``), as the HF tokenizer.json files of
# those models spell them. GPT-2's own regex is ByteLevel's ``use_regex``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (kind, regex): "gpt2" = ByteLevel's GPT-2 regex; "digits" = each digit alone, then GPT-2's
# regex (llama.cpp's STARCODER / SMOLLM group); "split" = the regex, then byte-level without a regex.
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, str | None]] = {
    **{k: ("gpt2", None) for k in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{k: ("digits", None) for k in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva")},
    **{k: ("split", _LLAMA3_SPLIT) for k in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                                               "smaug-bpe")},
    **{k: ("split", _QWEN2_SPLIT) for k in ("qwen2", "deepseek-r1-qwen", "stablelm2")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _token_content(tok: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------------------
# backends: encode text without BOS, decode ids, map tokens and ids


class _TokenizersBackend:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def post_processor_adds(self, bos_id: int | None) -> bool:
        """Whether the tokenizer.json post-processor prepends ``bos_id`` (Llama 2/3 tokenizers do)."""
        if bos_id is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos_id and self.encode("a")[:1] != [bos_id]


class _SentencePieceBackend:
    """sentencepiece's ``tokenizer.model``, plus the added/special tokens of tokenizer_config.json matched whole."""

    def __init__(self, model_file: Path, added: dict[str, int], legacy: bool):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.legacy = legacy
        self.special: dict[str, int] = dict(added)
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.special.setdefault(self.sp.id_to_piece(i), i)
        self.special_ids = {i: s for s, i in self.special.items()}
        names = sorted((s for s in self.special if s), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in names) + ")") if names else None

    def _encode_plain(self, text: str, first: bool) -> list[int]:
        if first or self.legacy:
            return self.sp.encode(text)
        # legacy=False (transformers): no dummy-prefix space after a special token
        unk = self.sp.id_to_piece(self.sp.unk_id())
        prefix = self.sp.encode(unk)
        ids = self.sp.encode(unk + text)
        return ids[len(prefix):] if ids[: len(prefix)] == prefix else ids

    def encode(self, text: str) -> list[int]:
        parts = self._split.split(text) if self._split else [text]
        out: list[int] = []
        for n, part in enumerate(parts):
            if not part:
                continue
            if part in self.special:
                out.append(self.special[part])
            else:
                out.extend(self._encode_plain(part, first=(n == 0)))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    pieces.append(self.special_ids[i])
            else:
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        if i in self.special_ids:
            return self.special_ids[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return max(self.sp.get_piece_size(), max(self.special_ids, default=-1) + 1)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF vocabularies -> tokenizers


def _gguf_added_tokens(tokens: list[str], types: list[int], vocab: dict[str, int]) -> list[AddedToken]:
    """Control / unknown tokens as special added tokens, user-defined ones as plain added tokens (matched whole)."""
    out = []
    for tok, ttype in zip(tokens, types):
        if tok not in vocab:
            continue
        if ttype in (GGUF_CONTROL, GGUF_UNKNOWN):
            out.append(AddedToken(tok, special=True, normalized=False))
        elif ttype == GGUF_USER_DEFINED:
            out.append(AddedToken(tok, special=False, normalized=False))
    return out


def gguf_gpt2_tokenizer(meta: dict[str, Any]) -> HFTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata of ``tokenizer.ggml.model == "gpt2"``."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        # a token outside the byte alphabet is spelled in it (as transformers' GGUF converter does)
        key = tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    pre = meta.get("tokenizer.ggml.pre") or "default"
    kind, regex = GGUF_PRE_TOKENIZERS.get(pre, ("gpt2", None))
    if pre not in GGUF_PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to zmzoo; splitting text with GPT-2's regex",
                      stacklevel=3)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                 ignore_merges=(kind == "split" and regex == _LLAMA3_SPLIT)))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=True)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_gguf_added_tokens(tokens, types, vocab))
    return tok


def gguf_llama_tokenizer(meta: dict[str, Any]) -> HFTokenizer:
    """A sentencepiece-style BPE ``tokenizers.Tokenizer`` (byte fallback, ``▁`` for spaces) from GGUF metadata of
    ``tokenizer.ggml.model == "llama"``: merges are recovered from the token scores, best-scoring merge first, as
    transformers' GGUF converter does.
    """
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # a sentencepiece BPE merge makes a normal piece from two pieces; rank it by the merged piece's score
    mergeable = {t for t, ty in zip(tokens, types) if ty in (GGUF_NORMAL, GGUF_USER_DEFINED)}
    ranked = []
    for t, score, ty in zip(tokens, scores, types):
        if ty != GGUF_NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, vocab[t], vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, ty in enumerate(types) if ty == GGUF_UNKNOWN), None)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None if unk_id is None else tokens[unk_id],
                                 fuse_unk=True, byte_fallback=True))
    # as sentencepiece and llama.cpp: a space is put before the text, and after each special token (HF's "legacy")
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *spaces] if add_prefix else spaces)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(_gguf_added_tokens(tokens, types, vocab))
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# the interface


class Tokenizer:
    """Text <-> token ids, the model's BOS/EOS ids, and its chat template.

    Build with ``Tokenizer.from_dir`` (an HF checkpoint directory), ``Tokenizer.from_gguf_metadata`` (the third value
    of ``zmzoo.models.weights.load_gguf``) or ``Tokenizer.from_gguf`` (a ``.gguf`` file).
    """

    def __init__(
        self,
        backend: _TokenizersBackend | _SentencePieceBackend,
        *,
        bos_id: int | None,
        eos_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
        special_tokens: dict[str, str | None],
        source: str,
    ):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        self.source = source

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos}, chat_template={self.has_chat_template})")

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included (the model's may be padded larger)."""
        return self._backend.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their single ids.

        Args:
            text: the text.
            add_bos: prepend the BOS id; default from the tokenizer config (``add_bos_token``). No second BOS is
                added when the text already starts with it (as a rendered chat template often does).
        """
        ids = self._backend.encode(text)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens written out unless ``skip_special_tokens``)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    @cached_property
    def word_classes(self) -> np.ndarray:
        """Token id -> the smallest id of its *word form* (int64, ``vocab_size`` long): its text stripped of
        surrounding whitespace, lower-cased, and a final ``s`` dropped from a word of 4 or more letters not ending in
        ``ss``, so `` The`` and ``the``, `` number`` and ``numbers`` share a class. Tokens of whitespace only keep a
        class of their own. ZeroMerge's prompt lookup compares tokens by it (``zmzoo.models.transformer.prompt_lookup``)
        so a draft that words a key differently from the text still finds it. Built on first use (one decode per
        token: about a second for a 50K vocabulary)."""
        first: dict[str, int] = {}
        out = np.arange(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            form = self.decode([i]).strip().lower()
            if not form:
                continue
            if len(form) >= 4 and form.endswith("s") and not form.endswith("ss") and form[:-1].isalpha():
                form = form[:-1]
            out[i] = first.setdefault(form, i)
        return out

    @cached_property
    def _template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the model's chat template.

        Args:
            messages: the conversation.
            add_generation_prompt: end with the cue that starts an assistant turn.
            **kwargs: further template variables (``tools``, ``enable_thinking``, ...).

        Returns:
            The prompt text; encode it with ``encode`` (which adds no second BOS).
        """
        if not self.chat_template:
            raise ValueError(
                f"the tokenizer of {self.source} has no chat template (no 'chat_template' in tokenizer_config.json, "
                f"chat_template.jinja or GGUF tokenizer.chat_template); format the prompt text yourself"
            )
        variables: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens}
        variables.update(kwargs)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    # -----------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of an HF checkpoint directory: ``tokenizer.json`` (preferred) or ``tokenizer.model``, with
        ``tokenizer_config.json``, ``config.json``, ``generation_config.json`` and ``chat_template.jinja``.
        """
        d = Path(path)
        tcfg = _read_json(d / "tokenizer_config.json")
        cfg = _read_json(d / "config.json")
        gcfg = _read_json(d / "generation_config.json")
        special_map = _read_json(d / "special_tokens_map.json")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {n: _token_content(tcfg.get(n, special_map.get(n))) for n in names}

        if (d / "tokenizer.json").is_file():
            backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend(
                HFTokenizer.from_file(str(d / "tokenizer.json"))
            )
        elif (d / "tokenizer.model").is_file():
            added = {}
            for i, entry in (tcfg.get("added_tokens_decoder") or {}).items():
                content = _token_content(entry)
                if content:
                    added[content] = int(i)
            backend = _SentencePieceBackend(d / "tokenizer.model", added, legacy=bool(tcfg.get("legacy", True)))
        else:
            raise FileNotFoundError(
                f"no tokenizer in {d}: expected tokenizer.json or tokenizer.model (tiktoken-only repos are not "
                f"supported)"
            )

        def tok_id(token: str | None) -> int | None:
            return None if token is None else backend.token_to_id(token)

        bos_id = tok_id(special["bos_token"])
        if bos_id is None:
            bos_id = next(iter(_ids(cfg.get("bos_token_id")) or _ids(gcfg.get("bos_token_id"))), None)
        eos_ids = _ids(gcfg.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
        eos_from_tok = tok_id(special["eos_token"])
        if eos_from_tok is not None:
            eos_ids.append(eos_from_tok)
        for n in names:  # fill token strings the configs leave out from their ids
            if special[n] is None:
                i = {"bos_token": bos_id, "eos_token": eos_ids[0] if eos_ids else None}.get(n)
                special[n] = None if i is None else backend.id_to_token(i)

        if "add_bos_token" in tcfg:
            add_bos = bool(tcfg["add_bos_token"])
        elif isinstance(backend, _TokenizersBackend):
            add_bos = backend.post_processor_adds(bos_id)
        else:
            add_bos = bos_id is not None  # sentencepiece LLaMA tokenizers add BOS by default

        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template")
        else:
            template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default") or next(iter(by_name.values()), None)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos, chat_template=template,
                   special_tokens=special, source=str(d))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "GGUF metadata") -> Tokenizer:
        """The tokenizer a GGUF file describes (``tokenizer.ggml.model`` ``gpt2`` or ``llama``)."""
        model = meta.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{source} has no tokenizer (no tokenizer.ggml.tokens)")
        if model == "gpt2":
            tok = gguf_gpt2_tokenizer(meta)
        elif model == "llama":
            tok = gguf_llama_tokenizer(meta)
        else:
            raise ValueError(f"{source}: GGUF tokenizer model {model!r} is not supported (gpt2, llama)")
        tokens = meta["tokenizer.ggml.tokens"]

        def get_id(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos_id = get_id("bos_token_id")
        eos_ids = [i for i in (get_id("eos_token_id"), get_id("eot_token_id"), get_id("eom_token_id"))
                   if i is not None]
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = model == "llama"  # llama.cpp adds BOS to sentencepiece vocabularies that do not say
        special = {
            name: tokens[i] if i is not None else None
            for name, i in (("bos_token", bos_id), ("eos_token", get_id("eos_token_id")),
                            ("unk_token", get_id("unknown_token_id")), ("pad_token", get_id("padding_token_id")))
        }
        add_bos = bool(add_bos) and bos_id is not None
        return cls(_TokenizersBackend(tok), bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"), special_tokens=special, source=source)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a ``.gguf`` file (reads its metadata only)."""
        from zmzoo.models.weights import open_gguf, read_gguf_metadata

        meta = read_gguf_metadata(open_gguf(path))  # a corrupt or truncated file: an error naming it
        return cls.from_gguf_metadata(meta, source=str(path))
