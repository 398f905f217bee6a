"""Writing weight-only quantized models as compressed-tensors ``pack-quantized`` checkpoints.

``pack_quantized_state(codes, ...)`` gives the tensors compressed-tensors stores for one linear (the
layout ``quant.compressed_tensors`` reads, and the one the ``compressed_tensors`` package's own
``PackedQuantizationCompressor.compress`` produces, byte for byte):

* ``weight_packed``: int32 ``[N, ceil(K * b / 32)]``, the unsigned codes packed along ``K``, low bits first;
* ``weight_scale``: ``[N, K / G]`` in the chosen scale dtype;
* ``weight_shape``: int64 ``[2]`` = ``(N, K)``;
* asymmetric only: ``weight_zero_point``: int32 ``[ceil(N * b / 32), K / G]``, the unsigned zero points
  packed along ``N``.

The format stores ``w = scale * (code - zero)`` with an integer zero point (``2**(b-1)`` when symmetric),
so codes are refused (``ValueError`` naming the field) unless they say exactly that: ``mins`` all zero,
integer ``zeros`` in ``[0, 2**b)`` (all ``2**(b-1)`` when symmetric), ``scales`` finite and exactly
representable in the scale dtype, ``bits`` 4 or 8.

``write_quantized_checkpoint`` writes a whole Hugging Face directory (atomically, see
``loaders.hf_dir_writer``): ``config.json`` (the source config, its ``torch_dtype`` / ``dtype`` the dense
dtype, plus the ``quantization_config``), safetensors shards and the tokenizer files. The
``quantization_config`` has one config group per group size (channel-wise linears, one group per row, in a
``channel`` group of their own). Each group's targets are one ``re:`` regex naming the projections in it by
their last name component (``re:(.*\\.)?(k_proj|q_proj)$``) when no projection name is in two groups, else
the exact module names; ``ignore`` lists ``lm_head`` and every dense module a target would match. Every
quantized linear thus matches exactly its group's targets, as compressed-tensors (and so transformers)
and asyncllm match them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from asyncllm.loaders.hf_dir_writer import (
    DEFAULT_MAX_SHARD_BYTES,
    TensorUnit,
    TokenizerSource,
    atomic_directory,
    tensor_nbytes,
    write_json,
    write_safetensors,
    write_tokenizer_files,
)
from asyncllm.quant.bitfields import pack_int32
from asyncllm.quant.packed import QuantCodes

CT_BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COMPRESSED_TENSORS_VERSION = "0.20.1"
"""The compressed-tensors release whose ``pack-quantized`` layout is written (the tests compare the tensors
with that package's own compressor)."""

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_LM_HEAD = "lm_head"


def _check_dtype(field: str, dtype: Any, allowed: tuple[torch.dtype, ...]) -> None:
    if dtype not in allowed:
        raise ValueError(f"{field}: expected one of {[str(d) for d in allowed]}, got {dtype!r}")


def check_pack_quantized(codes: QuantCodes, *, symmetric: bool, scale_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming the field unless ``pack-quantized`` stores ``codes`` exactly (see the
    module docstring)."""
    _check_dtype("scale_dtype", scale_dtype, SCALE_DTYPES)
    bits = codes.bits
    if bits not in CT_BITS:
        raise ValueError(f"bits: compressed-tensors pack-quantized stores {list(CT_BITS)}-bit codes, got {bits}")
    if codes.codes.numel() and int(codes.codes.max()) >= 1 << bits:
        raise ValueError(f"codes: values up to {int(codes.codes.max())} do not fit {bits} bits")
    if bool((codes.mins != 0).any()):
        raise ValueError("mins: compressed-tensors stores w = scale * (code - zero); nonzero mins cannot be written")
    zeros = codes.zeros
    if not bool(torch.isfinite(zeros).all()) or bool((zeros != zeros.round()).any()):
        raise ValueError("zeros: compressed-tensors zero points are integers")
    offset = float(1 << (bits - 1))
    if symmetric and bool((zeros != offset).any()):
        raise ValueError(f"zeros: symmetric storage needs every zero point to be 2**(bits-1) = {offset:g}")
    if zeros.numel() and (float(zeros.min()) < 0 or float(zeros.max()) >= 1 << bits):
        raise ValueError(f"zeros: zero points outside [0, {1 << bits}) do not fit {bits} bits")
    scales = codes.scales
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("scales: hold NaN or infinite values")
    if bool((scales.to(scale_dtype).float() != scales).any()):
        raise ValueError(f"scales: not exactly representable in {scale_dtype}; round them to it first")


def pack_quantized_state(codes: QuantCodes, *, symmetric: bool, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one linear (suffix -> tensor, see the module
    docstring); ``symmetric`` leaves out the zero point. Raises ``ValueError`` naming the field when the
    format cannot store ``codes`` exactly."""
    check_pack_quantized(codes, symmetric=symmetric, scale_dtype=scale_dtype)
    bits = codes.bits
    rows, cols = codes.shape
    state = {
        "weight_packed": pack_int32(codes.codes, bits, dim=1),
        "weight_scale": codes.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not symmetric:
        state["weight_zero_point"] = pack_int32(codes.zeros.to(torch.int64), bits, dim=0)
    return state


def _state_sizes(codes: QuantCodes, symmetric: bool, scale_dtype: torch.dtype) -> dict[str, int]:
    rows, cols = codes.shape
    groups = cols // codes.group_size
    words = 32 // codes.bits
    sizes = {"weight_packed": tensor_nbytes((rows, -(-cols // words)), torch.int32),
             "weight_scale": tensor_nbytes((rows, groups), scale_dtype),
             "weight_shape": tensor_nbytes((2,), torch.int64)}
    if not symmetric:
        sizes["weight_zero_point"] = tensor_nbytes((-(-rows // words), groups), torch.int32)
    return sizes


# ---------------------------------------------------------------------- quantization_config


def _group_key(codes: QuantCodes) -> int | None:
    """The group size a linear's config group is keyed by: ``None`` (channel) for one group per row."""
    return None if codes.group_size == codes.shape[1] else codes.group_size


def _last(name: str) -> str:
    return name.rpartition(".")[2]


def _ct_matches(name: str, target: str) -> bool:
    """compressed-tensors' name matching: ``re:`` regexes from the start of the name, else equality."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else name == target


def group_targets(members: Mapping[Any, Sequence[str]], dense_modules: Sequence[str]
                  ) -> tuple[dict[Any, list[str]], list[str]]:
    """The targets of each config group (``members``: key -> its module names) and the ``ignore`` list,
    as the module docstring describes; every module of a group matches only that group's targets."""
    suffixes = {key: {_last(name) for name in names} for key, names in members.items()}
    shared = any(suffixes[a] & suffixes[b] for a in suffixes for b in suffixes if a != b)
    if shared:
        targets = {key: sorted(names) for key, names in members.items()}
    else:
        targets = {key: [f"re:(.*\\.)?({'|'.join(re.escape(s) for s in sorted(names))})$"]
                   for key, names in suffixes.items()}
    quantized = {name for names in members.values() for name in names}
    ignore = [] if _LM_HEAD in quantized else [_LM_HEAD]
    for name in dense_modules:
        if name not in ignore and any(_ct_matches(name, t) for ts in targets.values() for t in ts):
            ignore.append(name)
    return targets, ignore


def quantization_config(quantized: Mapping[str, QuantCodes], *, bits: int, symmetric: bool,
                        dense_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The ``quantization_config`` of a ``pack-quantized`` checkpoint of ``quantized`` (module name ->
    codes) whose other modules (``dense_modules``: names of dense modules a target must not take) stay
    dense: one config group per group size (see the module docstring)."""
    members: dict[int | None, list[str]] = {}
    for name, codes in quantized.items():
        members.setdefault(_group_key(codes), []).append(name)
    order = sorted(members, key=lambda key: (key is None, key or 0))
    targets, ignore = group_targets({key: members[key] for key in order}, dense_modules)
    groups: dict[str, Any] = {}
    for index, key in enumerate(order):
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": key,
                   "strategy": "channel" if key is None else "group", "dynamic": False}
        groups[f"group_{index}"] = {"targets": targets[key], "weights": weights, "input_activations": None,
                                    "output_activations": None, "format": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "version": COMPRESSED_TENSORS_VERSION, "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}


# ---------------------------------------------------------------------- the directory


def write_quantized_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    hf_config: Mapping[str, Any],
    dense: Mapping[str, torch.Tensor],
    quantized: Mapping[str, QuantCodes],
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    dtype: torch.dtype,
    tokenizer_from: TokenizerSource | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write a self-contained compressed-tensors ``pack-quantized`` Hugging Face directory at ``out_dir``
    (see the module docstring) and return its path.

    ``dense``: every stored tensor that is not a quantized linear's weight (Hugging Face names; floating
    ones are cast to ``dtype``, others kept). ``quantized``: module name (``model.layers.0.mlp.down_proj``)
    -> its ``bits``-bit codes, stored as ``<name>.weight_packed`` etc. with ``scale_dtype`` scales; a
    quantized linear's bias stays in ``dense``. ``tokenizer_from``: a ``Checkpoint``, a ``Tokenizer``, or
    the path of a Hugging Face directory or a ``.gguf`` file (``None``: no tokenizer files). Everything is
    checked before anything is written; an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    Raises ``ValueError`` naming the module and field for codes the format cannot store exactly.
    """
    _check_dtype("dtype", dtype, DENSE_DTYPES)
    _check_dtype("scale_dtype", scale_dtype, SCALE_DTYPES)
    if bits not in CT_BITS:
        raise ValueError(f"bits: compressed-tensors pack-quantized stores {list(CT_BITS)}-bit codes, got {bits!r}")
    if not quantized:
        raise ValueError("quantized: no quantized module to write")
    for name, codes in quantized.items():
        if name.endswith(".weight") or not name:
            raise ValueError(f"quantized: keys are module names (model.layers.0.mlp.down_proj), got {name!r}")
        if f"{name}.weight" in dense:
            raise ValueError(f"dense: {name}.weight is also given quantized")
        if codes.bits != bits:
            raise ValueError(f"{name}: bits: {codes.bits}-bit codes in a {bits}-bit checkpoint")
        try:
            check_pack_quantized(codes, symmetric=symmetric, scale_dtype=scale_dtype)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    dense_modules = [name.removesuffix(".weight") for name in dense if name.endswith(".weight")]
    config = {**hf_config, "torch_dtype": _DTYPE_NAMES[dtype], "dtype": _DTYPE_NAMES[dtype],
              "quantization_config": quantization_config(quantized, bits=bits, symmetric=symmetric,
                                                         dense_modules=dense_modules)}
    units = [_dense_unit(name, tensor, dtype) for name, tensor in dense.items()]
    units += [_quantized_unit(name, codes, symmetric, scale_dtype) for name, codes in quantized.items()]
    units.sort(key=lambda unit: next(iter(unit.sizes)))
    with atomic_directory(out_dir, overwrite=overwrite) as directory:
        if tokenizer_from is not None:  # first: a missing tokenizer fails before the weights are written
            write_tokenizer_files(directory, tokenizer_from)
        write_json(directory / "config.json", config)
        write_safetensors(directory, units, max_shard_bytes)
    return Path(out_dir)


def _dense_unit(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> TensorUnit:
    stored = dtype if tensor.is_floating_point() else tensor.dtype
    return TensorUnit({name: tensor_nbytes(tensor.shape, stored)},
                      lambda: {name: tensor.to(dtype) if tensor.is_floating_point() else tensor})


def _quantized_unit(name: str, codes: QuantCodes, symmetric: bool, scale_dtype: torch.dtype) -> TensorUnit:
    sizes = {f"{name}.{part}": size for part, size in _state_sizes(codes, symmetric, scale_dtype).items()}

    def produce() -> dict[str, torch.Tensor]:
        state = pack_quantized_state(codes, symmetric=symmetric, scale_dtype=scale_dtype)
        return {f"{name}.{part}": tensor for part, tensor in state.items()}

    return TensorUnit(sizes, produce)
