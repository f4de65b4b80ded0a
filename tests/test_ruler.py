"""bench/ruler.py: RULER's synthetic tasks, generated locally. With SmolLM2's tokenizer when its GGUF is installed,
else a stand-in that counts words and punctuation: every task lands within tolerance of 1K and 4K tokens, the
references sit in the prompt as often as the task puts them there, scoring, determinism per seed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from zmzoo.models.weights import bundled_smollm2_gguf

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ruler():
    spec = importlib.util.spec_from_file_location("zmzoo_bench_ruler", BENCH / "ruler.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


class WordTokenizer:
    """Stand-in tokenizer: one token per word or punctuation mark."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [0] * len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def tok():
    path = bundled_smollm2_gguf()
    if path is None:
        return WordTokenizer()
    from zmzoo.tokenizer import Tokenizer

    return Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def samples(ruler, tok):
    """One sample per task and length, seed 0, generated once for the module."""
    return {(t, n): ruler.generate(t, tok, n, seed=0) for t in ruler.TASKS for n in (1024, 4096)}


TASK_NAMES = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


def test_the_tasks_are_rulers(ruler):
    assert list(ruler.TASKS) == TASK_NAMES
    assert {t: ruler.TASKS[t].max_new_tokens for t in ("niah_single_1", "vt", "cwe", "fwe")} == \
        {"niah_single_1": 128, "vt": 30, "cwe": 120, "fwe": 50}


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", TASK_NAMES)
def test_length_lands_near_the_target_never_above(ruler, tok, samples, task, length):
    s = samples[task, length]
    n = len(tok.encode(s.prompt, add_bos=False)) + len(tok.encode(s.answer_prefix, add_bos=False))
    assert n == s.meta["length"]
    assert 0.95 * length <= n <= length, f"{task}: {n} tokens for a target of {length}"
    assert s.meta["target_length"] == length and s.meta["task"] == task
    assert s.max_new_tokens == ruler.TASKS[task].max_new_tokens


def _count(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", [t for t in TASK_NAMES if t.startswith("niah")])
def test_niah_needles_and_references(ruler, samples, task, length):
    s = samples[task, length]
    a = ruler.TASKS[task].args
    n_q = a["num_needle_q"]
    n_k, n_v = max(a["num_needle_k"], n_q), a["num_needle_v"]
    assert len(s.references) == n_q * n_v
    assert len(s.meta["needles"]) == n_k * n_v
    for v in s.references:  # every answer once, in its needle
        assert s.prompt.count(v) == 1, v
        assert any(v in nd for nd in s.meta["needles"])
    for q in s.meta["queries"]:  # a queried key: in each of its needles and once in the question
        assert _count(s.prompt, q) == n_v + 1, q
        assert q in s.answer_prefix
    for nd in s.meta["needles"]:
        assert s.prompt.count(nd) == 1
    lines = s.prompt.count("One of the special magic")
    if a["type_haystack"] == "needle":
        assert lines == len(s.meta["needles"]) + s.meta["n_haystack"]
    else:
        assert lines == len(s.meta["needles"])
    if n_q * n_v == 1:
        assert s.prompt.startswith("A special magic") and s.answer_prefix.endswith("provided text is")
    else:
        assert s.prompt.startswith("Some special magic") and s.answer_prefix.endswith("provided text are")


@pytest.mark.parametrize("length", [1024, 4096])
def test_vt_chain(ruler, samples, length):
    s = samples["vt", length]
    chain, value = s.references, s.meta["value"]
    assert len(chain) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in chain)
    main = s.prompt.split("\n\nMemorize and track")[-1]  # after the worked example
    assert s.prompt.count("Memorize and track") == 2
    assert _count(main, f"VAR {chain[0]} = {value}") == 1
    for a, b in zip(chain, chain[1:]):
        assert main.count(f"VAR {b} = VAR {a} \n") == 1
    # each variable is assigned once and read once (the last is only assigned), in the question's text only
    assert [_count(s.prompt, v) for v in chain] == [2, 2, 2, 2, 1]
    assert f"assigned the value {value}, they are: " in s.answer_prefix and "5 variables" in s.answer_prefix
    # the worked example: its own 3-letter chain, answered
    ex = s.meta["example"]
    assert " ".join(ex["chains"][0]) + "\n" in s.prompt and value != ex["value"]


@pytest.mark.parametrize("length", [1024, 4096])
def test_cwe_common_words(ruler, samples, length):
    s = samples["cwe", length]
    cr, ur = (6, 1) if length < 4096 - 120 else (30, 3)
    assert tuple(s.meta["repeats"]) == (cr, ur)
    listing = s.prompt.rsplit("appear most often.\n", 1)[1].split("\nQuestion:")[0]
    entries = re.findall(r"(\d+)\. (\S+)", listing)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts: dict[str, int] = {}
    for _, w in entries:
        counts[w] = counts.get(w, 0) + 1
    assert len(s.references) == 10 and {counts[w] for w in s.references} == {cr}
    assert {c for w, c in counts.items() if w not in s.references} == {ur}
    assert len(counts) == s.meta["n_words"]
    # the worked example comes first, answered, with other words
    example = s.prompt.split("\nBelow is a numbered list")[0]
    assert "Answer: The top 10 words that appear most often in the list are: 1. " in example
    assert not set(re.findall(r"\d+\. (\S+)", example)) & set(counts)


@pytest.mark.parametrize("length", [1024, 4096])
def test_fwe_zipf_counts(ruler, samples, length):
    s = samples["fwe", length]
    words = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split(" ")
    n, z = s.meta["n_words"], ruler.zeta(2.0)
    want = [int(n * k**-2.0 / z) for k in (2, 3, 4)]
    assert [words.count(w) for w in s.references] == want
    assert words.count("...") == int(n / z) > want[0] > want[1] > want[2] > max(
        words.count(w) for w in set(words) - {"...", *s.references})
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in s.references)


def test_zeta_matches_known_values(ruler):
    assert ruler.zeta(2.0) == pytest.approx(3.141592653589793**2 / 6, rel=1e-12)
    assert ruler.zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-12)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_scoring_perfect_partial_empty(ruler, samples, task):
    s = samples[task, 1024]
    refs = s.references
    assert ruler.score(task, " " + ", ".join(r.upper() for r in refs) + ".\n", refs) == 1.0
    if len(refs) > 1:
        assert ruler.score(task, refs[0], refs) == pytest.approx(1 / len(refs))
    else:
        assert ruler.score(task, refs[0][:-1], refs) == 0.0
    assert ruler.score(task, "", refs) == 0.0


def test_string_match_metrics(ruler):
    refs = ["Paris", "Lyon", "Nice", "Lille"]
    assert ruler.string_match_all("paris and NICE", refs) == 0.5
    assert ruler.string_match_part("paris and NICE", refs) == 1.0
    assert ruler.string_match_part("Marseille", refs) == 0.0
    assert ruler.postprocess("  a\x00b\tc \n") == "a\nb\nc"
    with pytest.raises(ValueError, match="niah_single_1"):
        ruler.score("niah", "x", ["x"])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_per_seed_and_seeds_differ(ruler, tok, samples, task):
    again = ruler.generate(task, tok, 1024, seed=0)
    assert again == samples[task, 1024]
    other = ruler.generate(task, tok, 1024, seed=1)
    assert other.prompt != again.prompt and other.references != again.references


def test_prose_is_named_and_too_short_lengths_are_refused(ruler, tok, samples):
    s = samples["niah_single_2", 1024]
    assert s.meta["prose_name"] == "installed" and "sha256" in s.meta["prose"]
    assert "pydoc_data.topics" in s.meta["prose"]
    words = ruler.prose_words(ruler.load_prose())
    assert len(words) > 1000 and all(re.fullmatch(r"[a-z]{4,12}", w) for w in words)
    docs = ruler.generate("niah_single_2", tok, 1024, seed=0, prose="python-docs")
    assert docs.meta["prose_name"] == "python-docs" and docs.prompt != s.prompt
    with pytest.raises(ValueError, match="too short"):
        ruler.generate("vt", tok, 300, seed=0)
    with pytest.raises(ValueError, match="prose="):
        ruler.generate("niah_single_2", tok, 1024, seed=0, prose="essays")
