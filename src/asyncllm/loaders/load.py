"""Model references (local directory, ``.gguf`` file or hub id) resolved and opened as a ``Checkpoint``."""

from __future__ import annotations

import os
import pathlib

from asyncllm.loaders.checkpoint import Checkpoint
from asyncllm.loaders.gguf import load_gguf
from asyncllm.loaders.hf_dir import CONFIG_FILE, load_hf_dir
from asyncllm.loaders.hub import download_snapshot, looks_like_hub_id

GGUF_SUFFIX = ".gguf"


def resolve_model_path(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path:
    """An existing local path as given (``~`` expanded), else, for an ``org/name`` string, the hub
    snapshot directory (see ``hub.download_snapshot``). Anything else raises ``FileNotFoundError``."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model: expected a path or a hub id string, got {type(model).__name__}")
    text = os.fspath(model)
    if not isinstance(text, str) or not text:
        raise ValueError(f"model: expected a non-empty path or hub id, got {model!r}")
    path = pathlib.Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(model, str) and looks_like_hub_id(model):
        return download_snapshot(model, revision=revision, cache_dir=cache_dir)
    raise FileNotFoundError(f"model path {text!r} does not exist (and is not a hub id 'org/name')")


def _single_gguf_in(directory: pathlib.Path) -> pathlib.Path | None:
    candidates = sorted(directory.glob("*" + GGUF_SUFFIX))
    if len(candidates) > 1:
        raise ValueError(f"{directory} has no {CONFIG_FILE} and several GGUF files "
                         f"({', '.join(p.name for p in candidates)}); pass the .gguf file to load")
    return candidates[0] if candidates else None


def load_checkpoint(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dequantize_weights: bool = False,
) -> Checkpoint:
    """Open ``model``: a Hugging Face directory, a ``.gguf`` file, a directory whose only weights are one
    ``.gguf`` file, or a hub id. Tensors are not read until ``Checkpoint.tensors`` is iterated.
    Weight-only quantized checkpoints stream their weights as codes (see ``Checkpoint.quantization``)
    unless ``dequantize_weights``, which decodes them to dense floats at load."""
    path = resolve_model_path(model, revision=revision, cache_dir=cache_dir)
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(f"model file {path} is not a .gguf file; for safetensors weights pass their "
                             "directory (with its config.json)")
        return load_gguf(path, dequantize_weights=dequantize_weights)
    if not (path / CONFIG_FILE).is_file():
        gguf_file = _single_gguf_in(path)
        if gguf_file is not None:
            return load_gguf(gguf_file, dequantize_weights=dequantize_weights)
    return load_hf_dir(path, dequantize_weights=dequantize_weights)
