"""Texts for the quality tasks: English prose that ships with Python (the default), the installed packages' READMEs
(``readmes``), or files; cut into sentences for the passkey task's prose filler."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path
from typing import Any

_CODE_CHARS = set("{}[]=<>_*#`|\\$@;~^")


def prose_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a text: not indented (code examples, continuation lists), no heading underlines, ending
    like a sentence, mostly letters, few code symbols. Lines of a paragraph are joined with single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or not lines[0].strip():
            continue
        if lines[0][:1].isspace() or lines[0].lstrip().startswith((">>>", "...", "*", "-", "+", "|")):
            continue
        if any(re.fullmatch(r"\s*([*=~^\-#])\1{2,}\s*", ln) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        para = re.sub(r"\s+", " ", para).strip()
        para = re.sub(r"(\w)- (\w)", r"\1-\2", para)  # words hyphenated across a line break
        if len(para) < 120 or not para.endswith((".", "!", "?")):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        code = sum(c in _CODE_CHARS for c in para)
        if letters / len(para) < 0.88 or code / len(para) > 0.01:
            continue
        out.append(para)
    return out


def default_texts() -> list[dict[str, Any]]:
    """English prose shipped with Python: the language reference (pydoc_data.topics) and LICENSE.txt's history."""
    texts = []
    try:
        from pydoc_data.topics import topics

        paras = []
        for key in sorted(topics):
            paras += prose_paragraphs(topics[key])
        texts.append({"name": "python-reference", "source": "pydoc_data.topics (the Python language reference, "
                      f"{len(topics)} sections), prose paragraphs only", "text": "\n\n".join(paras)})
    except ImportError:
        pass
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        raw = lic.read_text(encoding="utf-8", errors="replace")
        hist = raw.split("B. TERMS AND CONDITIONS")[0]
        paras = prose_paragraphs(hist)
        if paras:
            texts.append({"name": "python-license-history", "source": f"{lic} (section A, history), prose paragraphs",
                          "text": "\n\n".join(paras)})
    if not texts:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # importing this prints the Zen
            import this
        zen = "".join(this.d.get(c, c) for c in this.s)
        texts.append({"name": "zen-of-python", "source": "the this module", "text": zen})
    return texts


def readme_texts() -> list[dict[str, Any]]:
    """English prose from the READMEs (long descriptions) of the installed Python packages: a second, independent
    prose source (``--text readmes``), e.g. to check settings tuned on the default texts."""
    from importlib import metadata

    paras, names = [], []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        got = prose_paragraphs(body) if isinstance(body, str) else []
        if got:
            paras += got
            names.append(dist.metadata["Name"])
    if not paras:
        raise SystemExit("--text readmes: no installed package has a README with prose paragraphs")
    return [{"name": "package-readmes", "source": f"READMEs of {len(names)} installed packages ({', '.join(names)}), "
             "prose paragraphs only", "text": "\n\n".join(paras)}]


def load_texts(files: list[str] | None) -> list[dict[str, Any]]:
    """``--text``: files (``readmes`` for the packages' READMEs), or the default texts when none is given."""
    if not files:
        return default_texts()
    texts = []
    for f in files:
        if f == "readmes":
            texts += readme_texts()
            continue
        p = Path(f)
        raw = p.read_text(encoding="utf-8", errors="replace")
        texts.append({"name": p.name, "source": str(p.resolve()), "text": re.sub(r"[ \t]+", " ", raw).strip()})
    return texts


def sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para.replace("\n", " ")) if s.strip()]
    return out


def prose_sentences(texts: list[dict[str, Any]]) -> list[str]:
    """The sentences of ``texts`` of a filler's length (20-400 characters)."""
    return [s for t in texts for s in sentences(t["text"]) if 20 <= len(s) <= 400]
