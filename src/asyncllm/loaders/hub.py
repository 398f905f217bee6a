"""Hugging Face Hub ids (``org/name``) resolved to a local snapshot directory.

``huggingface_hub`` is an optional dependency (extra ``hub``) imported only when a hub id is used.
Offline mode (``HF_HUB_OFFLINE=1``, read at call time) restricts resolution to the local cache; a
model that is not cached then fails with ``FileNotFoundError`` saying how to pass a local path.
"""

from __future__ import annotations

import os
import pathlib
import re

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
)


def looks_like_hub_id(model: str) -> bool:
    """True for ``org/name`` strings (one slash, no leading dot, path separators or spaces)."""
    return _HUB_ID.fullmatch(model) is not None and ".." not in model


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES


def _how_to_fix(repo_id: str) -> str:
    return (
        f"Pass a local path instead (a directory with config.json and *.safetensors, or a .gguf file), "
        f"or download the model first, e.g. `hf download {repo_id}` with network access."
    )


def download_snapshot(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Return the local snapshot directory of ``repo_id``, downloading config, tokenizer and safetensors
    files unless offline. Raises ``FileNotFoundError`` when the model cannot be found or fetched."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path, and loading it from the Hugging Face Hub needs the optional "
            f"dependency huggingface_hub (pip install 'asyncllm[hub]'). {_how_to_fix(repo_id)}"
        ) from error
    offline = hub_offline()
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=list(ALLOW_PATTERNS),
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as error:
        reason = "HF_HUB_OFFLINE=1 forbids downloads" if offline else f"it could not be downloaded ({error})"
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path and is not in the local Hugging Face cache; "
            f"{reason}. {_how_to_fix(repo_id)}"
        ) from error
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path, and the Hugging Face Hub refused it: {error}. "
            f"{_how_to_fix(repo_id)}"
        ) from error
    except HfHubHTTPError as error:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local path, and downloading it failed: {error}. "
            f"{_how_to_fix(repo_id)}"
        ) from error
    return pathlib.Path(snapshot)
