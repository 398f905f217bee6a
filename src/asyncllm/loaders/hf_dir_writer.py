"""Writing Hugging Face model directories: atomically, safetensors shards, and the tokenizer files.

``atomic_directory(out_dir)`` yields a temporary sibling directory (``.<name>.tmp-<hex>``) to write into and
renames it to ``out_dir`` only when the block completes; on any exception (``KeyboardInterrupt`` included)
the temporary directory is removed and ``out_dir`` is left as it was. An existing non-empty ``out_dir`` is
refused unless ``overwrite``, which replaces it only once the new directory is complete.

``write_safetensors`` stores named tensors as ``model.safetensors``, or, above ``max_shard_bytes``, as
``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (transformers' layout). Tensors
come in units (one dense tensor, or the parts of one quantized module) that are never split across shards
and are only materialised when their shard is written.

``write_tokenizer_files`` makes the directory load with both ``asyncllm.tokenizer.Tokenizer.from_path`` and
``transformers.AutoTokenizer.from_pretrained``: from a Hugging Face directory it copies the tokenizer files;
from a GGUF (or any ``Tokenizer``) it writes ``tokenizer.json`` from the ``tokenizers`` backend (with a
post-processor adding BOS / EOS exactly when the tokenizer's explicit flags do), a ``tokenizer_config.json``
with the chat template, special tokens and ``tokenizer_class: PreTrainedTokenizerFast``, and a
``generation_config.json`` with the BOS / EOS ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file

from asyncllm.loaders.checkpoint import Checkpoint
from asyncllm.loaders.hf_dir import INDEX_FILE, SINGLE_FILE
from asyncllm.tokenizer import Tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""transformers' default shard size ("5GB")."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt")
"""The files copied from a Hugging Face source directory, when present."""

_PROBE = "Hello, world! 123 \u00e9t\u00e9 \u4f60\u597d"


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` to write into, renamed to ``out_dir`` when the block completes
    (see the module docstring). Raises ``FileExistsError`` for an existing file, or a non-empty directory
    without ``overwrite``."""
    target = Path(out_dir)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _fresh_sibling(target, "tmp")
    try:
        yield temporary
        _sync_tree(temporary)
        _check_target(target, overwrite)  # nothing appeared meanwhile
        _install(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _check_target(target: Path, overwrite: bool) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"out_dir: {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir: {target} exists and is not empty (pass overwrite=True to replace it)")


def _fresh_sibling(target: Path, kind: str) -> Path:
    """A new directory next to ``target`` (created with the process umask, unlike ``mkdtemp``)."""
    while True:
        candidate = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _sync_tree(directory: Path) -> None:
    """Flush the written files (and the directory entries) to disk before the rename publishes them."""
    for path in directory.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync everywhere
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _install(temporary: Path, target: Path) -> None:
    if not target.exists():
        os.replace(temporary, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(temporary, target)
        return
    old = _fresh_sibling(target, "old")
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(temporary, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorUnit:
    """Tensors stored together: ``sizes`` maps each name to its byte size, ``produce()`` returns the
    tensors (called once, when their shard is written)."""

    sizes: Mapping[str, int]
    produce: Callable[[], Mapping[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count * torch.empty((), dtype=dtype).element_size()


def write_safetensors(directory: Path, units: Sequence[TensorUnit], max_shard_bytes: int) -> list[str]:
    """Write ``units`` into ``directory`` (see the module docstring); returns the file names written.
    A produced unit whose names or byte sizes differ from its ``sizes`` raises ``ValueError``."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive integer, got {max_shard_bytes!r}")
    names = [name for unit in units for name in unit.sizes]
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"tensor names given twice: {duplicates}")
    shards: list[list[TensorUnit]] = []
    size = 0
    for unit in units:
        if not shards or (size + unit.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    if len(shards) <= 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards or [[]], strict=True):
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for unit in shard:
            produced = dict(unit.produce())
            if {n: tensor_nbytes(t.shape, t.dtype) for n, t in produced.items()} != dict(unit.sizes):
                raise ValueError(f"tensors {sorted(unit.sizes)}: produced other names or sizes than planned")
            for name, tensor in produced.items():
                stored = tensor.detach().contiguous().cpu()
                storage = stored.untyped_storage().data_ptr()
                if storage in storages and stored.numel():  # safetensors refuses tensors sharing memory (tied)
                    stored = stored.clone()
                    storage = stored.untyped_storage().data_ptr()
                storages.add(storage)
                tensors[name] = stored
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        # safetensors creates its files owner-only; give them the directory's (umask-derived) read bits
        os.chmod(directory / file, directory.stat().st_mode & 0o666)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(files) > 1:
        total = sum(unit.nbytes for unit in units)
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        files.append(INDEX_FILE)
    return files


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- tokenizer


TokenizerSource = Checkpoint | Tokenizer | str | os.PathLike[str]


def write_tokenizer_files(directory: Path, source: TokenizerSource) -> list[str]:
    """Write the tokenizer of ``source`` into ``directory`` (see the module docstring): a ``Checkpoint``
    (its HF directory or GGUF file), a ``Tokenizer``, or the path of an HF directory or a ``.gguf`` file.
    Returns the file names written; ``FileNotFoundError`` when an HF directory holds no tokenizer."""
    if isinstance(source, Tokenizer):
        return _write_from_tokenizer(directory, source)
    if isinstance(source, Checkpoint):
        if source.format == "gguf":
            if source.gguf_metadata is not None:
                tokenizer = Tokenizer.from_gguf_metadata(source.gguf_metadata, path=source.local_path)
            else:
                tokenizer = Tokenizer.from_path(source.local_path)
            return _write_from_tokenizer(directory, tokenizer)
        return _copy_hf_tokenizer(directory, Path(source.local_path))
    path = Path(source).expanduser()
    if path.is_dir():
        return _copy_hf_tokenizer(directory, path)
    if path.is_file():
        return _write_from_tokenizer(directory, Tokenizer.from_path(path))
    raise FileNotFoundError(f"tokenizer_from: {path} does not exist")


def _copy_hf_tokenizer(directory: Path, source: Path) -> list[str]:
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        raise FileNotFoundError(f"tokenizer_from: {source} holds no tokenizer.json or tokenizer.model")
    for name in present:
        shutil.copyfile(source / name, directory / name)
    return present


def _write_from_tokenizer(directory: Path, tokenizer: Tokenizer) -> list[str]:
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    add_bos, add_eos = tokenizer.add_bos_token, tokenizer.add_eos_token
    special = tokenizer.special_tokens
    if add_bos is not None or add_eos is not None:
        backend.post_processor = _post_processor(backend, special, bool(add_bos), bool(add_eos))
    for text in (_PROBE, ""):
        if backend.encode(text).ids != tokenizer.encode(text):
            raise ValueError("tokenizer_from: its BOS / EOS rule cannot be written as a tokenizer.json "
                             "post-processor")
    backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                              **special}
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    if add_eos is not None:
        config["add_eos_token"] = add_eos
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    write_json(directory / "tokenizer_config.json", config)
    generation: dict[str, Any] = {}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    eos = list(tokenizer.eos_token_ids)
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    write_json(directory / "generation_config.json", generation)
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def _post_processor(backend: tokenizers.Tokenizer, special: Mapping[str, str], add_bos: bool,
                    add_eos: bool) -> tokenizers.processors.PostProcessor:
    """A template adding BOS / EOS as the flags say (as transformers' Llama tokenizers build it), after the
    backend's own non-template post-processor (e.g. byte-level offset trimming), if any."""
    from tokenizers import processors

    bos = special.get("bos_token") if add_bos else None
    eos = special.get("eos_token") if add_eos else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special_ids = [(token, backend.token_to_id(token)) for token in dict.fromkeys(t for t in (bos, eos) if t)]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)
    original = backend.post_processor
    if original is None or isinstance(original, processors.TemplateProcessing):
        return template
    return processors.Sequence([original, template])
