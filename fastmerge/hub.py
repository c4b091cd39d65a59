"""Model references as mergekit takes them: a local folder, or a Hugging Face hub id.

``org/name``, ``name`` or ``org/name@revision`` (a branch, tag or commit) that is not an
existing local path is fetched with ``huggingface_hub.snapshot_download`` into the hub cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), and only the
files a merge reads: the safetensors shards and their index, the configs, and the tokenizer.
``HF_HUB_OFFLINE=1`` reads the cache only (no network); so does a failed connection when the
cache holds the revision, as ``huggingface_hub`` does. A path that starts with ``/``, ``.`` or
``~`` is always local. (``model+lora`` references are split by :mod:`fastmerge.adapters` and
each part resolved here.) Every error is one line naming the config entry (``models[1]``, ``base_model``, ...).
"""
from __future__ import annotations

import os
import re

# the files of a checkpoint `fastmerge merge` reads or copies next to the merge (no *.bin,
# *.pt, *.gguf: fastmerge reads safetensors only)
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
    "*.model", "chat_template*", "preprocessor_config.json",
]
_REPO = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class HubError(ValueError):
    """A model reference that cannot be resolved (the message names the entry)."""


def is_hub_id(ref: str) -> bool:
    """Whether ``ref`` (not an existing local path) names a hub repository, as mergekit reads a
    model reference: ``name``, ``org/name``, each optionally ``@revision``."""
    if not isinstance(ref, str) or not ref or ref.startswith(("/", ".", "~")) or os.path.exists(ref):
        return False
    repo = ref.split("@", 1)[0]
    return bool(_REPO.match(repo)) and "--" not in repo and ".." not in repo


def split(ref: str):
    """``(repo_id, revision or None)`` of a hub reference."""
    repo, _, revision = ref.partition("@")
    return repo, (revision or None)


def cache_dir() -> str:
    """The hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "on", "yes")


def local_path(ref: str, role: str) -> str:
    """The local folder of model reference ``ref`` (``role`` names it in errors): ``ref``
    itself when it is not a hub id, else the cached (downloaded if needed) snapshot."""
    if not isinstance(ref, str):
        raise HubError(f"{role}: a model reference must be a string, got {ref!r}")
    if "://" in ref:
        raise HubError(f"{role} {ref!r} is a URL: give a local folder or a hub id (org/name)")
    if not is_hub_id(ref):
        return ref
    return _download(ref, role)


def _download(ref: str, role: str) -> str:
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors
    except ImportError:
        raise HubError(f"{role} {ref!r} is a Hugging Face hub id and huggingface_hub is not "
                       "installed: `pip install huggingface_hub`, or give a local folder") from None
    repo, revision = split(ref)
    where = f"{role} {ref!r}"
    try:
        return hf.snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                    allow_patterns=ALLOW_PATTERNS, local_files_only=offline())
    except errors.GatedRepoError:
        raise HubError(f"{where}: the repository is gated; accept its terms on huggingface.co "
                       "and log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} not found on the hub") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such repository on the hub (or it is private: log in "
                       "with `hf auth login` or set HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
        raise HubError(f"{where} is not a local folder and not in the hub cache {cache_dir()} "
                       f"({why}); download it first (`hf download {repo}`) or give a local "
                       "folder") from None
    except (OSError, errors.HfHubHTTPError) as exc:
        raise HubError(f"{where}: download failed: {' '.join(str(exc).split())[:300]}") from None
