"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", github NVIDIA/RULER), generated locally and deterministically from a seed.

    python bench/ruler.py --model smollm2-135m --length 1024                 # every task once, full cache
    python bench/ruler.py --tasks niah_single_1,vt --method zeromerge --kv-ratio 0.2 --samples 4 --out out/ruler

Tasks (``TASKS``; RULER's ``scripts/synthetic.yaml``): ``niah_single_1/2/3``, ``niah_multikey_1/2/3``,
``niah_multivalue``, ``niah_multiquery`` (needles "One of the special magic {numbers|uuids} for {key} is: {value}."
in a haystack of noise sentences, prose, or other needles), ``vt`` (variable tracking: a chain of 4 hops
"VAR B = VAR A" hidden among noise sentences, after one worked example), ``cwe`` (common words extraction: a numbered
list of words in which 10 are frequent, after one worked example), ``fwe`` (frequent words extraction: coded words
with Zipf counts). Templates, answer prefixes, needle formats, numbers of needles / keys / values / queries, tokens to
generate, the 40 depths of the essay haystack, the singular wording of one-answer NIAH prompts, VT's 5-letter
variables and 5-digit values with a ~500-token worked example of 3-letter variables, CWE's repeat counts (6/1 with a
20-word example below RULER's 4096-token sequence length, 30/3 with a 40-word example from it on), FWE's 6-letter
coded words, vocabulary of length // 50, zeta(2) counts and '...' as the top noise word: as RULER's scripts.

A ``Sample`` is the task's prompt (no chat template: the caller wraps it), the ``answer_prefix`` that RULER appends
after the model's template (the harness appends it after the assistant header and lets the model continue), the
references, ``max_new_tokens`` and ``meta`` (what was drawn, which prose and words were used). ``length`` is the
prompt's length in tokens, ``len(encode(prompt)) + len(encode(answer_prefix))`` without BOS or chat template: the
haystack (sentences, words or needles) is grown by a search over its size to the largest that fits, so a sample lands
within one haystack unit of ``length``, never above. RULER's ``max_seq_length`` also counts the tokens to generate and
the model's template: its 4K sample is ``length = 4096 - max_new_tokens - template tokens`` here; the choices RULER
makes on ``max_seq_length`` (CWE's counts) are made on ``length + max_new_tokens``.

Scoring (RULER's ``scripts/eval/synthetic/constants.py``): ``string_match_all`` for every task here (the fraction of
the references found, case-insensitive, in the prediction), ``string_match_part`` for RULER's QA tasks (1 when any
reference is found); per sample in [0, 1] (RULER averages over samples and prints percentages). Predictions are
stripped and control characters turned into newlines first, as RULER's ``postprocess_pred``.

Where this differs from RULER (no downloads, no nltk/wonderwords/numpy/scipy):
- The essay haystack (Paul Graham's essays, downloaded by RULER) is English prose that installs with the
  dependencies: the prose paragraphs of the Python language reference (``pydoc_data.topics``, "python-docs") and of
  the READMEs (long descriptions) of the installed Python distributions but zmzoo, read through
  ``importlib.metadata`` ("readmes"); ``prose="installed"`` (default) is both, docs first. It is far shorter than
  the essays (~170K characters here against ~3M) and repeated when a length needs more words, as RULER repeats them.
  ``meta["prose"]`` names the source, its distributions and a hash of its text, since the READMEs depend on what is
  installed. Sentences are split with a regex instead of nltk's ``sent_tokenize``.
- Words: there is no /usr/share/dict here and no wonderwords, so the words come from the same prose: its distinct
  lowercase alphabetic words of 4-12 letters, less a short stop list (``prose_words``: ~2.5K words from the default
  prose here; CWE refuses a length that needs more, past ~55K tokens with SmolLM2's tokenizer, where RULER moves on
  to a downloaded list of English words). NIAH word keys are two such words joined by a hyphen (RULER: an adjective
  and a noun of wonderwords); CWE's words are such words, less those of its own template (RULER: wonderwords' nouns,
  adjectives and verbs); ``meta["words"]`` says so. FWE's template words are kept out of its coded words.
- Everything is drawn from one ``random.Random(seed)`` (uuids as ``uuid.UUID(int=getrandbits(128), version=4)``, as
  RULER), and drawn once per sample before the haystack is sized: needle depths are drawn as fractions of the
  haystack (RULER draws line indices per haystack size), so the search over the size sees one fixed sample.
- Draws that would make a sample ambiguous are redrawn: keys and values are distinct from each other and from every
  distractor needle's (no distractor key contains a key or lies within one), keys and values of an essay haystack do
  not occur in its prose; CWE's worked example takes other words than
  the question's list (RULER samples both from the same list). VT's worked example is drawn directly with its own
  variables and value (RULER draws one and renames its variables by string replacement).
- RULER's fixed number of samples per task and ``remove_newline_tab`` option are the caller's business.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import string
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Protocol


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...


# ---------------------------------------------------------------------------------------------------- scoring
def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references that occur (case-insensitive) in the prediction."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 when any reference occurs (case-insensitive) in the prediction, else 0.0 (RULER's QA metric)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


METRICS: dict[str, Callable[[str, list[str]], float]] = {"string_match_all": string_match_all,
                                                         "string_match_part": string_match_part}


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One RULER task: its generator family (``kind``), the family's settings, tokens to generate, metric."""

    name: str
    kind: str  # niah | vt | cwe | fwe
    args: dict[str, Any]
    max_new_tokens: int
    metric: str = "string_match_all"


def _niah(name: str, haystack: str, k: str, v: str, n_k: int = 1, n_v: int = 1, n_q: int = 1) -> Task:
    return Task(name, "niah", dict(type_haystack=haystack, type_needle_k=k, type_needle_v=v, num_needle_k=n_k,
                                   num_needle_v=n_v, num_needle_q=n_q), 128)


TASKS: dict[str, Task] = {t.name: t for t in [
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", n_k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", n_v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", n_q=4),
    Task("vt", "vt", dict(type_haystack="noise", num_chains=1, num_hops=4), 30),
    Task("cwe", "cwe", dict(freq_cw=30, freq_ucw=3, num_cw=10), 120),
    Task("fwe", "fwe", dict(alpha=2.0, coded_wordlen=6), 50),
]}

TEMPLATES = {  # RULER's scripts/data/synthetic/constants.py: (template, answer prefix)
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
            "dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)); .5 never occurs
VT_EXAMPLE_TOKENS = 500  # RULER sizes VT's worked example to a 500-token sequence


@dataclass(frozen=True)
class Sample:
    """A generated sample: ``prompt`` (no chat template), ``answer_prefix`` (appended after the template's assistant
    header), ``references`` (scored with the task's metric), ``max_new_tokens``, ``meta`` (what was drawn and used)."""

    prompt: str
    references: list[str]
    answer_prefix: str
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


def score(task: str, prediction: str, references: list[str]) -> float:
    """The task's metric (RULER's) of one prediction against its references, in [0, 1]."""
    return METRICS[_task(task).metric](postprocess(prediction), references)


def _task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"RULER task {task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task]


# ---------------------------------------------------------------------------------------------------- prose
@dataclass(frozen=True)
class Prose:
    """English prose for the essay haystack and the word lists: ``name``, a ``source`` line naming where it comes from
    (and its text's hash), and the ``text`` (paragraphs separated by blank lines)."""

    name: str
    source: str
    text: str


PROSE_SOURCES = ("installed", "readmes", "python-docs")
_MARKUP_START = ("#", ">", "|", "-", "*", "+", "..", "=", ":", "[", "!", "<", "$", "%")
_CODE_CHARS = set("{}[]=<>_*#|\\$@;~^")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a README or doc page: code fences and indented blocks dropped, markdown links and inline
    code reduced to their text, and only paragraphs of ordinary sentences kept (long enough, ending like a sentence,
    mostly letters, hardly any code symbols, no URLs)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)  # fenced code
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.split("\n")
        if not lines[0].strip() or lines[0][:1].isspace() or lines[0].lstrip().startswith(_MARKUP_START):
            continue
        para = " ".join(ln.strip() for ln in lines)
        para = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", para)  # [text](url) -> text
        para = re.sub(r"`+([^`]*)`+", r"\1", para)  # `code` -> code
        para = re.sub(r"\s+", " ", para).strip()
        if len(para) < 80 or not para.endswith((".", "!", "?")) or "http" in para:
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters < 0.85 * len(para) or sum(c in _CODE_CHARS for c in para) > 0.01 * len(para):
            continue
        out.append(para)
    return out


def _with_hash(source: str, text: str) -> str:
    return f"{source}; {len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


@cache
def load_prose(name: str = "installed") -> Prose:
    """The installed prose ``name``: "readmes" (the READMEs of the installed Python distributions, by name),
    "python-docs" (the Python language reference of ``pydoc_data.topics``) or "installed" (both, docs first)."""
    if name == "readmes":
        from importlib import metadata

        paras: list[str] = []
        seen: set[str] = set()
        names = []
        dists = sorted(metadata.distributions(), key=lambda d: ((d.metadata["Name"] or "").lower(), d.version or ""))
        for dist in dists:
            if (dist.metadata["Name"] or "").lower() == "zmzoo":
                continue  # its own README changes with every commit
            body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
            got = [p for p in _paragraphs(body) if p not in seen] if isinstance(body, str) else []
            if got:
                seen.update(got)
                paras += got
                names.append(f"{dist.metadata['Name']} {dist.version}")
        if not paras:
            raise RuntimeError("prose='readmes': no installed distribution has a README with prose paragraphs")
        text = "\n\n".join(paras)
        return Prose(name, _with_hash(f"prose paragraphs of the READMEs of {len(names)} installed distributions "
                                      f"({', '.join(names)})", text), text)
    if name == "python-docs":
        from pydoc_data.topics import topics

        text = "\n\n".join(p for key in sorted(topics) for p in _paragraphs(topics[key]))
        return Prose(name, _with_hash(f"prose paragraphs of the Python {sys.version.split()[0]} language reference "
                                      f"(pydoc_data.topics, {len(topics)} sections)", text), text)
    if name == "installed":
        parts = [load_prose("python-docs"), load_prose("readmes")]
        text = "\n\n".join(p.text for p in parts)
        return Prose(name, _with_hash(" + ".join(f"[{p.source}]" for p in parts), text), text)
    raise ValueError(f"prose={name!r} is not one of {', '.join(PROSE_SOURCES)} (or pass a Prose)")


def _prose(prose: Prose | str) -> Prose:
    return prose if isinstance(prose, Prose) else load_prose(prose)


_STOP = set("""about above after again against also because been before being below between both cannot could does
doing down during each from further have having here into itself just more most much must only other over same should
some such than that their theirs them themselves then there these they this those through under until very what when
where which while whom will with would your yours yourself""".split())


@lru_cache(maxsize=8)
def prose_words(prose: Prose) -> tuple[str, ...]:
    """The prose's distinct lowercase alphabetic words of 4-12 letters, less a short stop list, sorted."""
    return tuple(sorted(set(re.findall(r"(?<![\w'-])[a-z]{4,12}(?![\w'-])", prose.text)) - _STOP))


@lru_cache(maxsize=8)
def _prose_words_split(prose: Prose) -> tuple[str, ...]:
    """The prose as RULER splits its essays: whitespace-separated pieces."""
    return tuple(prose.text.split())


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip()) if s]


# ---------------------------------------------------------------------------------------------------- sizing
def _count(tok: TokenizerLike, prompt: str, answer_prefix: str) -> int:
    return len(tok.encode(prompt, add_bos=False)) + len(tok.encode(answer_prefix, add_bos=False))


def _fit(build: Callable[[int], tuple[str, str]], tok: TokenizerLike, length: int, lo: int, hi: int | None = None,
         what: str = "sample") -> int:
    """The largest haystack size n in [lo, hi] whose ``build(n)`` (prompt, answer prefix) has at most ``length``
    tokens: doubling from ``lo`` to bracket it, then bisection (a haystack of n + 1 units is that of n plus one)."""
    if _count(tok, *build(lo)) > length:
        raise ValueError(f"{what}: length {length} is too short for the smallest haystack ({lo} units give "
                         f"{_count(tok, *build(lo))} tokens)")
    good, step = lo, max(1, lo)
    bad = None
    while bad is None:
        n = good + step if hi is None else min(good + step, hi)
        if n == good:  # hi reached and it fits
            return good
        if _count(tok, *build(n)) <= length:
            good, step = n, step * 2
        else:
            bad = n
    while bad - good > 1:
        mid = (good + bad) // 2
        if _count(tok, *build(mid)) <= length:
            good = mid
        else:
            bad = mid
    return good


def _insert(lines: list[str], items: list[str], fracs: list[float]) -> list[str]:
    """``items`` inserted into ``lines`` at fractions ``fracs`` of its length, in order (ties keep item order)."""
    n = len(lines)
    at = sorted(zip((min(int(f * n), n) for f in fracs), range(len(items))))
    out, prev = [], 0
    for pos, i in at:
        out += lines[prev:pos]
        out.append(items[i])
        prev = pos
    return out + lines[prev:]


# ---------------------------------------------------------------------------------------------------- NIAH
def _drawer(rng: random.Random, kind: str, words: tuple[str, ...]) -> Callable[[], str]:
    if kind == "numbers":
        return lambda: str(rng.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "uuids":
        return lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return lambda: f"{rng.choice(words)}-{rng.choice(words)}"
    raise ValueError(f"needle type {kind!r}")


def _unique(draw: Callable[[], str], used: set[str], ok: Callable[[str], bool] = lambda x: True) -> str:
    """A draw not drawn before, for which ``ok`` holds."""
    while True:
        x = draw()
        if x not in used and ok(x):
            used.add(x)
            return x


def _gen_niah(task: Task, tok: TokenizerLike, length: int, rng: random.Random, prose: Prose) -> Sample:
    a = task.args
    hay, type_k, type_v = a["type_haystack"], a["type_needle_k"], a["type_needle_v"]
    n_q = a["num_needle_q"]
    n_k, n_v = max(a["num_needle_k"], n_q), a["num_needle_v"]
    words = prose_words(prose)
    draw_k, draw_v = _drawer(rng, type_k, words), _drawer(rng, type_v, words)
    used: set[str] = set()
    # no key or value may occur in the prose of an essay haystack
    ok = (lambda x: x not in prose.text) if hay == "essay" else (lambda x: True)
    keys, values, needles = [], [], []
    for _ in range(n_k):
        keys.append(_unique(draw_k, used, ok))
        values.append([_unique(draw_v, used, ok) for _ in range(n_v)])
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    random.Random(rng.getrandbits(64)).shuffle(needles)
    picked = rng.sample(range(n_k), n_q)
    queries = [keys[i] for i in picked]
    answers = [v for i in picked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if n_q > 1 else queries[0]

    template, prefix = TEMPLATES["niah"]
    tv = type_v
    if n_q * n_v == 1:  # RULER's singular wording, applied to template + answer prefix alike
        template, prefix = (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                            .replace("answers", "answer") for s in (template, prefix))
        tv = type_v[:-1]
    answer_prefix = prefix.format(type_needle_v=tv, query=query)

    if hay == "essay":
        depths = rng.sample(DEPTHS, len(needles))
        pieces = _prose_words_split(prose)

        def context(n: int) -> str:
            text = " ".join(pieces[i % len(pieces)] for i in range(n))
            return " ".join(_insert(_sentences(text), needles, [d / 100 for d in depths]))

        unit, lo = "words", 100
    else:
        fracs = [rng.random() for _ in needles]
        if hay == "noise":
            def line(i: int) -> str:
                return NOISE
        else:  # distractor needles with other keys and values, drawn as the haystack grows
            d_rng = random.Random(rng.getrandbits(64))
            dk, dv = _drawer(d_rng, type_k, words), _drawer(d_rng, type_v, words)
            distinct = lambda x: all(x not in k and k not in x for k in keys)  # no key within another
            distractors: list[str] = []

            def line(i: int) -> str:
                while len(distractors) <= i:
                    distractors.append(NEEDLE.format(type_needle_v=type_v, key=_unique(dk, used, distinct),
                                                     value=_unique(dv, used)))
                return distractors[i]

        def context(n: int) -> str:
            return "\n".join(_insert([line(i) for i in range(n)], needles, fracs))

        unit, lo = ("noise sentences" if hay == "noise" else "distractor needles"), 1

    def build(n: int) -> tuple[str, str]:
        return template.format(type_needle_v=tv, context=context(n), query=query), answer_prefix

    n = _fit(build, tok, length, lo, what=task.name)
    prompt, _ = build(n)
    meta = dict(haystack=hay, n_haystack=n, haystack_unit=unit, keys=keys, queries=queries, needles=needles,
                needle_depths=[round(prompt.index(s) / len(prompt), 4) for s in needles])
    if hay == "essay":
        meta["prose"] = prose.source
    if "words" in (type_k, type_v):
        meta["words"] = f"hyphenated pairs of words of the prose {prose.name!r}"
    return Sample(prompt, answers, answer_prefix, task.max_new_tokens, meta)


# ---------------------------------------------------------------------------------------------------- VT
def _vt_draw(rng: random.Random, n_chains: int, n_hops: int, letters: int, used: set[str]) -> tuple[list, str]:
    """Chains of distinct variables ``letters`` long and a 5-digit value not drawn before."""
    var = lambda: "".join(rng.choices(string.ascii_uppercase, k=letters))
    chains = [[_unique(var, used) for _ in range(n_hops + 1)] for _ in range(n_chains)]
    value = _unique(lambda: str(rng.randint(10000, 99999)), used)
    return chains, value


def _vt_text(chains: list[list[str]], value: str, fracs: list[list[float]], n: int) -> str:
    """``n`` noise sentences with each chain's statements inserted in order at fractions ``fracs`` of them."""
    lines = [NOISE] * n
    for vs, fr in zip(chains, fracs):
        stmts = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(len(vs) - 1)]
        lines = _insert(lines, stmts, fr)
    return "\n".join(lines).replace(". \n", ".\n")


def _gen_vt(task: Task, tok: TokenizerLike, length: int, rng: random.Random, prose: Prose) -> Sample:
    n_chains, n_hops = task.args["num_chains"], task.args["num_hops"]
    template, prefix = TEMPLATES["vt"]
    used: set[str] = set()

    def fracs() -> list[list[float]]:
        return [sorted(rng.random() for _ in range(n_hops + 1)) for _ in range(n_chains)]

    # the worked example: 3-letter variables, at most 10 hops, sized to VT_EXAMPLE_TOKENS, then its answer
    ex_chains, ex_value = _vt_draw(rng, n_chains, min(10, n_hops), 3, used)
    ex_fracs = fracs()
    ex_prefix = prefix.format(num_v=min(10, n_hops) + 1, query=ex_value)

    def ex_build(n: int) -> tuple[str, str]:
        return template.format(context=_vt_text(ex_chains, ex_value, ex_fracs, n), query=ex_value), ex_prefix

    ex_n = _fit(ex_build, tok, VT_EXAMPLE_TOKENS, 1, what=f"{task.name} worked example")
    example = "".join(ex_build(ex_n)) + " " + " ".join(ex_chains[0]) + "\n"

    chains, value = _vt_draw(rng, n_chains, n_hops, 5, used)
    main_fracs = fracs()
    answer_prefix = prefix.format(num_v=n_hops + 1, query=value)

    def build(n: int) -> tuple[str, str]:
        return example + "\n" + template.format(context=_vt_text(chains, value, main_fracs, n), query=value), \
            answer_prefix

    n = _fit(build, tok, length, 1, what=task.name)
    meta = dict(haystack="noise", n_haystack=n, haystack_unit="noise sentences", chains=chains, value=value,
                example=dict(chains=ex_chains, value=ex_value, n_haystack=ex_n))
    return Sample(build(n)[0], chains[0], answer_prefix, task.max_new_tokens, meta)


# ---------------------------------------------------------------------------------------------------- CWE
def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _gen_cwe(task: Task, tok: TokenizerLike, length: int, rng: random.Random, prose: Prose) -> Sample:
    a = task.args
    n_cw = a["num_cw"]
    template, prefix = TEMPLATES["cwe"]
    own = set(re.findall(r"[a-z]+", (template + prefix).lower()))
    vocab = [w for w in prose_words(prose) if w not in own]
    rng.shuffle(vocab)
    # RULER decides on its max_seq_length (prompt + tokens to generate): below 4096, lighter repeats
    if length + task.max_new_tokens < 4096:
        (ex_n, ex_cr, ex_ur), (cr, ur) = (20, 3, 1), (6, 1)
    else:
        (ex_n, ex_cr, ex_ur), (cr, ur) = (40, 10, 3), (a["freq_cw"], a["freq_ucw"])
    seed_ex, seed_main = rng.getrandbits(64), rng.getrandbits(64)

    def listing(words: list[str], c: int, u: int, seed: int) -> str:
        lst = words[:n_cw] * c + words[n_cw:] * u
        random.Random(seed).shuffle(lst)
        return _numbered(lst)

    ex_words = vocab[:ex_n]
    example = template.format(context=listing(ex_words, ex_cr, ex_ur, seed_ex)) + prefix + " " + \
        _numbered(ex_words[:n_cw])
    pool = vocab[ex_n:]

    def build(n: int) -> tuple[str, str]:
        return example + "\n" + template.format(context=listing(pool[:n], cr, ur, seed_main)), prefix

    n = _fit(build, tok, length, n_cw + 1, hi=len(pool), what=task.name)
    if n == len(pool) and _count(tok, *build(n)) < 0.9 * length:
        raise ValueError(f"cwe: the prose {prose.name!r} has {len(pool)} words to list, too few for {length} tokens")
    meta = dict(n_words=n, repeats=(cr, ur), example=dict(n_words=ex_n, repeats=(ex_cr, ex_ur)),
                words=f"distinct words of the prose {prose.name!r} less those of the template", prose=prose.source)
    return Sample(build(n)[0], pool[:n_cw], prefix, task.max_new_tokens, meta)


# ---------------------------------------------------------------------------------------------------- FWE
def zeta(s: float, n: int = 1000) -> float:
    """Riemann zeta(s), s > 1: the first n terms plus the Euler-Maclaurin tail (error ~ n^-(s+3))."""
    return sum(k**-s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n**-s + s * n ** (-s - 1) / 12


def _gen_fwe(task: Task, tok: TokenizerLike, length: int, rng: random.Random, prose: Prose) -> Sample:
    alpha, wlen = task.args["alpha"], task.args["coded_wordlen"]
    template, prefix = TEMPLATES["fwe"]
    own = set(re.findall(r"[a-z]+", (template + prefix).lower()))
    vocab_size = max(length // 50, 5)
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=wlen))
        if w not in own:
            vocab.add(w)
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the top-ranked word is noise
    z = zeta(alpha)
    seed = rng.getrandbits(64)

    def counts(n: int) -> list[int]:
        return [int(n * k**-alpha / z) for k in range(1, len(ranked) + 1)]

    def build(n: int) -> tuple[str, str]:
        words = [w for w, c in zip(ranked, counts(n)) for _ in range(c)]
        random.Random(seed).shuffle(words)
        return template.format(context=" ".join(words)), prefix

    n = _fit(build, tok, length, 10, what=task.name)
    meta = dict(n_words=n, counts=dict(zip(ranked[:4], counts(n)[:4])), vocab_size=len(ranked))
    return Sample(build(n)[0], ranked[1:4], prefix, task.max_new_tokens, meta)


_GENERATORS = {"niah": _gen_niah, "vt": _gen_vt, "cwe": _gen_cwe, "fwe": _gen_fwe}


def generate(task: str, tokenizer: TokenizerLike, length: int, *, seed: int = 0,
             prose: Prose | str = "installed") -> Sample:
    """One sample of a RULER task.

    Args:
        task: a name of ``TASKS``.
        tokenizer: has ``encode(text, add_bos=False) -> list[int]`` (zmzoo's ``Tokenizer``).
        length: the prompt's length in tokens (prompt + answer prefix, no BOS, no chat template); the sample lands
            within one haystack unit of it, never above.
        seed: everything drawn (keys, values, words, depths, orders) comes from ``random.Random(seed)``.
        prose: a ``Prose`` or the name of an installed one (``PROSE_SOURCES``) for the essay haystack and the words.
    Returns:
        a ``Sample``; ``meta`` records the task, target and actual lengths, the seed and what was drawn and used.
    """
    spec = _task(task)
    p = _prose(prose)
    sample = _GENERATORS[spec.kind](spec, tokenizer, length, random.Random(seed), p)
    n_tok = _count(tokenizer, sample.prompt, sample.answer_prefix)
    meta = dict(task=task, seed=seed, target_length=length, length=n_tok, prose_name=p.name, **sample.meta)
    return Sample(sample.prompt, sample.references, sample.answer_prefix, sample.max_new_tokens, meta)


# ---------------------------------------------------------------------------------------------------- driver
def prompt_ids(tok: Any, sample: Sample) -> list[int]:
    """The token ids fed to the model: the sample's prompt as the user's message in the tokenizer's chat template
    (the bare prompt without one), then the answer prefix after the assistant header (RULER's convention), which the
    model continues. ``main`` and the quality harness's ``ruler`` task (``bench.tasks.ruler``) both use it."""
    if tok.has_chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True)
    else:
        text = sample.prompt
    return tok.encode(text) + tok.encode(sample.answer_prefix, add_bos=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="all", help=f"comma-separated, or all: {', '.join(TASKS)}")
    p.add_argument("--length", type=int, default=1024, help="prompt tokens (prompt + answer prefix, no template)")
    p.add_argument("--samples", type=int, default=1, help="samples per task (seeds seed .. seed + samples - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prose", default="installed", choices=PROSE_SOURCES)
    p.add_argument("--method", default="full")
    p.add_argument("--kv-ratio", type=float)
    p.add_argument("--kv-budget", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--out", help="directory for ruler.json")
    ns = p.parse_args(argv)

    import zmzoo

    tasks = list(TASKS) if ns.tasks == "all" else ns.tasks.split(",")
    for t in tasks:
        _task(t)
    kw = {k: v for k, v in (("kv_ratio", ns.kv_ratio), ("kv_budget", ns.kv_budget)) if v is not None}
    longest = max(TASKS[t].max_new_tokens for t in tasks)
    gen = zmzoo.load(ns.model, method=ns.method, compile=False, max_seq_len=ns.length + longest + 64,
                     device=ns.device, dtype=ns.dtype, verbose=False, **kw)
    tok = gen.tokenizer
    prose = load_prose(ns.prose)
    print(f"[ruler] {ns.model}, method {ns.method} {kw or ''}, length {ns.length}; prose: {prose.source}",
          file=sys.stderr)
    rows, per_task = [], {}
    for t in tasks:
        scores = []
        for s in range(ns.seed, ns.seed + ns.samples):
            sample = generate(t, tok, ns.length, seed=s, prose=prose)
            ids = prompt_ids(tok, sample)
            t0 = time.perf_counter()
            pred = gen.generate(ids, max_new_tokens=sample.max_new_tokens)
            sc = score(t, pred, sample.references)
            scores.append(sc)
            rows.append(dict(task=t, seed=s, score=sc, prediction=pred, references=sample.references,
                             prompt_tokens=len(ids), meta=sample.meta, seconds=round(time.perf_counter() - t0, 2)))
            print(f"[ruler] {t} seed {s}: {len(ids)} tokens, score {sc:.2f}; refs {sample.references}; "
                  f"predicted {postprocess(pred)[:100]!r}", file=sys.stderr, flush=True)
        per_task[t] = sum(scores) / len(scores)
    print(f"\n{'task':<18} score (mean over {ns.samples} sample(s), 0-100)")
    for t, v in per_task.items():
        print(f"{t:<18} {100 * v:6.1f}")
    print(f"{'average':<18} {100 * sum(per_task.values()) / len(per_task):6.1f}")
    if ns.out:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ruler.json").write_text(json.dumps(dict(
            model=ns.model, method=ns.method, cache=kw, length=ns.length, prose=prose.source,
            scores=per_task, samples=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
