"""A weight-only quantized Hugging Face checkpoint (AWQ, GPTQ, compressed-tensors) as the model consumes it.

The stored tensors are read as stored (no float cast: fp16 scales must reach the unpackers exactly), passed
through ``quant.codes_stream`` (each quantized linear becomes its exact codes: ``P.codes``,
``P.code_scales``, ``P.code_zeros``, ``P.code_mins``, and ``P.input_perm`` under act-order), and every other
float tensor is then cast to the requested dtype. With act-order configs every quantized linear gets an
``input_perm`` (the identity where its ``g_idx`` did not reorder anything), so the model can declare the
parameter up front.

``dequantize_weights``: each quantized linear is instead yielded as a dense ``P.weight`` in the requested
dtype (its exact dequantized values, input channels back in checkpoint order), and the model is dense.

Each quantized linear's parts, code width, groups and act-order are those of its own scheme
(``WeightQuantSpec.scheme_for``: compressed-tensors config groups may differ).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from asyncllm.loaders.checkpoint import TensorSource
from asyncllm.quant.codes_stream import (
    CODE_MINS,
    CODE_SCALES,
    CODE_ZEROS,
    CODES,
    INPUT_PERM,
    codes_stream,
    module_parts,
)
from asyncllm.quant.config import WeightOnlyQuantization
from asyncllm.quant.hf_config import WeightQuantSpec, WeightScheme
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import QuantCodes

_CODE_SUFFIXES = (CODES, CODE_SCALES, CODE_ZEROS, CODE_MINS)
_CANONICAL = (*_CODE_SUFFIXES, INPUT_PERM)


class RawTensorSource(TensorSource, Protocol):
    """A source that can also stream its tensors exactly as stored (no float conversion)."""

    def raw_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


def quantized_prefixes(spec: WeightQuantSpec, names: Sequence[str]) -> list[str]:
    """Checkpoint module prefixes of the quantized linears, in order of their first stored part."""
    markers = module_parts(spec).all - {"weight"}  # dense modules store a ``weight`` too (naive-quantized codes)
    prefixes: dict[str, None] = {}
    for name in names:
        prefix, _, suffix = name.rpartition(".")
        if (prefix and prefix not in prefixes and suffix in markers and spec.is_quantized(prefix)
                and suffix in module_parts(spec, prefix).required):
            prefixes.setdefault(prefix)
    return list(prefixes)


def weight_only_quantization(spec: WeightQuantSpec, prefixes: Sequence[str]) -> WeightOnlyQuantization:
    """The model-side config: every listed linear stored with its scheme's code width and groups."""
    layers: dict[str, LayerQuant] = {}
    for prefix in prefixes:
        scheme = spec.scheme_for(prefix)
        if scheme is None:
            raise ValueError(f"{prefix}: not a quantized linear of this checkpoint")
        layers[prefix] = LayerQuant(bits=scheme.bits, group_size=scheme.group_size, permuted=scheme.desc_act)
    return WeightOnlyQuantization(spec.method, layers)


@dataclass(frozen=True)
class QuantizedHFSource:
    """Streams ``base`` with its quantized linears as exact codes, or dense (see the module docstring)."""

    base: RawTensorSource
    spec: WeightQuantSpec
    prefixes: tuple[str, ...]
    dequantize_weights: bool = False

    def _scheme(self, prefix: str) -> WeightScheme:
        scheme = self.spec.scheme_for(prefix)
        if scheme is None:
            raise ValueError(f"{prefix}: not a quantized linear of this checkpoint")
        return scheme

    def tensor_names(self) -> tuple[str, ...]:
        quantized = set(self.prefixes)
        names: list[str] = []
        seen: dict[str, set[str]] = {}
        for name in self.base.tensor_names():
            prefix, _, suffix = name.rpartition(".")
            parts = module_parts(self.spec, prefix) if prefix in quantized else None
            if parts is None or suffix not in parts.all:
                names.append(name)
                continue
            stored = seen.setdefault(prefix, set())
            complete = parts.required <= stored
            stored.add(suffix)
            if not complete and parts.required <= stored:
                names.extend(self._canonical_names(prefix))
        return tuple(names)

    def _canonical_names(self, prefix: str) -> list[str]:
        if self.dequantize_weights:
            return [f"{prefix}.weight"]
        suffixes = (*_CODE_SUFFIXES, INPUT_PERM) if self._scheme(prefix).desc_act else _CODE_SUFFIXES
        return [f"{prefix}.{suffix}" for suffix in suffixes]

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """``codes_stream`` yields each linear's canonical tensors one after another; they are gathered and
        re-emitted as a unit (identity ``input_perm`` added, or dequantized)."""
        quantized = set(self.prefixes)
        current: str | None = None
        parts: dict[str, torch.Tensor] = {}
        for name, tensor in codes_stream(self.spec, self.base.raw_tensors()):
            prefix, _, suffix = name.rpartition(".")
            if current is not None and (prefix != current or suffix not in _CANONICAL):
                yield from self._finish(current, parts, dtype)
                current, parts = None, {}
            if prefix in quantized and suffix in _CANONICAL:
                current = prefix
                parts[suffix] = tensor
                continue
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
        if current is not None:
            yield from self._finish(current, parts, dtype)

    def _finish(self, prefix: str, parts: dict[str, torch.Tensor],
                dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        codes = parts[CODES]
        perm = parts.get(INPUT_PERM)
        if self.dequantize_weights:
            exact = QuantCodes(codes, parts[CODE_SCALES], parts[CODE_ZEROS], parts[CODE_MINS],
                               bits=self._scheme(prefix).bits, group_size=codes.shape[1] // parts[CODE_SCALES].shape[1])
            weight = exact.dequantize()
            if perm is not None:  # the codes hold W[:, perm]; put the input channels back in place
                restored = torch.empty_like(weight)
                restored[:, perm] = weight
                weight = restored
            yield f"{prefix}.weight", weight.to(dtype)
            return
        for suffix in _CODE_SUFFIXES:
            yield f"{prefix}.{suffix}", parts[suffix]
        if self._scheme(prefix).desc_act:
            yield f"{prefix}.{INPUT_PERM}", perm if perm is not None else torch.arange(codes.shape[1])
