"""Hugging Face model directories: ``config.json`` plus safetensors weights (single file or sharded).

Tensors are streamed one at a time with ``safetensors.safe_open``, so peak memory is one tensor beyond
what the caller keeps. ``.bin`` (pickle) checkpoints are refused: they can execute code when loaded.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open

from asyncllm.json_files import read_json_object
from asyncllm.loaders.checkpoint import Checkpoint
from asyncllm.loaders.quantized_source import QuantizedHFSource, quantized_prefixes, weight_only_quantization
from asyncllm.quant.config import UNQUANTIZED
from asyncllm.quant.hf_config import quant_spec_from_hf_config

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class SafetensorsSource:
    """Tensors of one or more safetensors files; ``names[i]`` lives in ``files[file_of[i]]``."""

    files: tuple[pathlib.Path, ...]
    names: tuple[str, ...]
    file_of: tuple[int, ...]

    def tensor_names(self) -> tuple[str, ...]:
        return self.names

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.raw_tensors():
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor

    def raw_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors exactly as stored (dtype included)."""
        position = 0
        for file_index, path in enumerate(self.files):
            with safe_open(str(path), framework="pt") as handle:
                while position < len(self.names) and self.file_of[position] == file_index:
                    name = self.names[position]
                    yield name, handle.get_tensor(name)
                    position += 1


def _file_keys(path: pathlib.Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _sharded_source(directory: pathlib.Path) -> SafetensorsSource:
    index_path = directory / INDEX_FILE
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' object naming the tensors' shard files")
    shard_names = list(dict.fromkeys(str(shard) for shard in weight_map.values()))
    files = tuple(directory / shard for shard in shard_names)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} names shard files that do not exist: {missing}")
    names: list[str] = []
    file_of: list[int] = []
    for file_index, (shard, path) in enumerate(zip(shard_names, files, strict=True)):
        for key in _file_keys(path):
            if weight_map.get(key) == shard:
                names.append(key)
                file_of.append(file_index)
    absent = sorted(set(weight_map) - set(names))
    if absent:
        raise ValueError(f"{index_path}: tensors listed in the index are missing from their shards: {absent}")
    return SafetensorsSource(files, tuple(names), tuple(file_of))


def _weights_source(directory: pathlib.Path) -> SafetensorsSource:
    if (directory / INDEX_FILE).is_file():
        return _sharded_source(directory)
    single = directory / SINGLE_FILE
    if single.is_file():
        names = tuple(_file_keys(single))
        return SafetensorsSource((single,), names, (0,) * len(names))
    pickles = [name for name in _PICKLE_FILES if (directory / name).is_file()]
    if pickles:
        raise ValueError(
            f"{directory} holds only PyTorch pickle weights ({', '.join(pickles)}); .bin checkpoints are "
            "not supported. Convert them to safetensors (save_pretrained(..., safe_serialization=True))."
        )
    raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE} (safetensors weights)")


def load_hf_dir(directory: pathlib.Path, *, dequantize_weights: bool = False) -> Checkpoint:
    """Open a Hugging Face model directory; raises ``FileNotFoundError`` naming what is missing. A
    weight-only quantized one (``quantization_config``: AWQ, GPTQ, compressed-tensors) streams its quantized
    linears as exact codes, or dense with ``dequantize_weights`` (``loaders.quantized_source``); an
    unsupported ``quantization_config`` raises ``ValueError`` naming the field."""
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; it is not a Hugging Face model directory")
    hf_config = read_json_object(config_path)
    source = _weights_source(directory)
    spec = quant_spec_from_hf_config(hf_config)
    if spec is None:
        return Checkpoint(hf_config=hf_config, local_path=directory, format="hf", source=source)
    prefixes = quantized_prefixes(spec, source.names)
    if not prefixes:
        raise ValueError(f"{directory}: config.json declares {spec.method} quantization but no tensor holds "
                         "quantized weights")
    quantized = QuantizedHFSource(source, spec, tuple(prefixes), dequantize_weights)
    quantization = UNQUANTIZED if dequantize_weights else weight_only_quantization(spec, prefixes)
    return Checkpoint(hf_config=hf_config, local_path=directory, format="hf", source=quantized,
                      quantization=quantization)
