"""Streams a quantized checkpoint's tensors with every quantized linear in the exact, canonical form.

For each quantized linear at checkpoint module name ``P`` (``model.layers.0.self_attn.q_proj``) the
format's own tensors (AWQ / GPTQ ``qweight``, ``qzeros``, ``scales``, ``g_idx``; compressed-tensors
``weight_packed``, ``weight_scale``, ``weight_shape``, ``weight_zero_point``, ``weight_g_idx``) are replaced
by:

* ``P.codes``: uint8 ``[N, K]``, one code per byte, in ``[0, 2**bits)``;
* ``P.code_scales``, ``P.code_zeros``, ``P.code_mins``: float32 ``[N, K / G]``, with
  ``w[n, k] = code_scales[n, g] * (codes[n, k] - code_zeros[n, g]) + code_mins[n, g]``, ``g = k // G``
  (``QuantCodes``; ``G = K / code_scales.shape[1]``);
* ``P.input_perm``: int64 ``[K]``, only when act-order reorders the inputs (a non-trivial ``g_idx``):
  the codes hold ``W'[:, j] = W[:, input_perm[j]]`` and the layer computes ``x[:, input_perm] @ W'^T``.

Everything else (``P.bias``, norms, embeddings, dense linears) passes through unchanged, in order. A
module's parts may arrive in any order, interleaved with others and across shard files; its canonical
tensors are yielded as soon as its last required part arrives, so only the incomplete modules' parts are
held (and the names of completed ones, to catch duplicates).
A compressed-tensors checkpoint whose config groups differ stores each linear with its own group's scheme
(``WeightQuantSpec.scheme_for``): its parts, code width and group size are that scheme's.
Exactness needs the parts as stored: scales converted to a narrower float type (e.g. float16 to bfloat16)
before they reach this stream are no longer the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from asyncllm.quant.act_order import PermutedCodes, group_permutation
from asyncllm.quant.awq import unpack_awq
from asyncllm.quant.compressed_tensors import unpack_naive_quantized, unpack_pack_quantized
from asyncllm.quant.gptq import unpack_gptq
from asyncllm.quant.hf_config import WeightQuantSpec, WeightScheme

CODES = "codes"
CODE_SCALES = "code_scales"
CODE_ZEROS = "code_zeros"
CODE_MINS = "code_mins"
INPUT_PERM = "input_perm"
CANONICAL_SUFFIXES = (CODES, CODE_SCALES, CODE_ZEROS, CODE_MINS, INPUT_PERM)


@dataclass(frozen=True)
class ModuleParts:
    """The tensor suffixes one quantized linear is stored as: ``required`` complete it; ``optional`` may
    come before or after the others (GPTQ ``g_idx`` without act-order: checked to be trivial)."""

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def all(self) -> frozenset[str]:
        return self.required | self.optional


def module_parts(spec: WeightQuantSpec, prefix: str | None = None) -> ModuleParts:
    """The parts of the quantized linear at ``prefix`` of a checkpoint described by ``spec`` (without
    ``prefix``: the parts every quantized linear shares one scheme of, else all parts any scheme stores)."""
    if prefix is not None:
        scheme = spec.scheme_for(prefix)
        if scheme is None:
            raise ValueError(f"{prefix}: not a quantized linear of this checkpoint")
        return _scheme_parts(spec, scheme)
    every = [_scheme_parts(spec, scheme) for scheme in spec.schemes]
    if len(every) == 1:
        return every[0]
    return ModuleParts(frozenset().union(*(p.all for p in every)))


def _scheme_parts(spec: WeightQuantSpec, scheme: WeightScheme) -> ModuleParts:
    if spec.method == "awq":
        return ModuleParts(frozenset({"qweight", "qzeros", "scales"}))
    if spec.method == "gptq":
        base = frozenset({"qweight", "qzeros", "scales"})
        return ModuleParts(base | {"g_idx"}) if scheme.desc_act else ModuleParts(base, frozenset({"g_idx"}))
    names = {"weight_packed", "weight_shape"} if scheme.storage == "pack-quantized" else {"weight"}
    names.add("weight_scale")
    if not scheme.symmetric:
        names.add("weight_zero_point")
    if scheme.desc_act:
        names.add("weight_g_idx")
    return ModuleParts(frozenset(names))


def unpack_module(spec: WeightQuantSpec, parts: Mapping[str, torch.Tensor], prefix: str | None = None
                  ) -> PermutedCodes:
    """One quantized linear's exact codes from its stored ``parts`` (suffix -> tensor); ``prefix`` picks
    its scheme when the checkpoint has several (see ``module_parts``)."""
    scheme = spec.scheme if prefix is None else spec.scheme_for(prefix)
    if scheme is None:
        raise ValueError(f"{prefix}: not a quantized linear of this checkpoint")
    if spec.method == "awq":
        return PermutedCodes(unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"]))
    if spec.method == "gptq":
        return unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bits=scheme.bits,
                           storage=scheme.storage, act_order=scheme.desc_act)
    zero_point, g_idx = parts.get("weight_zero_point"), parts.get("weight_g_idx")
    if scheme.storage == "pack-quantized":
        return unpack_pack_quantized(parts["weight_packed"], parts["weight_scale"], parts["weight_shape"],
                                     zero_point, g_idx, bits=scheme.bits, act_order=scheme.desc_act)
    return unpack_naive_quantized(parts["weight"], parts["weight_scale"], zero_point, g_idx, bits=scheme.bits,
                                  act_order=scheme.desc_act)


def canonical_tensors(prefix: str, unpacked: PermutedCodes) -> list[tuple[str, torch.Tensor]]:
    """The canonical ``(name, tensor)`` pairs of the linear at ``prefix`` (see the module docstring)."""
    codes = unpacked.codes
    named = [(f"{prefix}.{CODES}", codes.codes), (f"{prefix}.{CODE_SCALES}", codes.scales),
             (f"{prefix}.{CODE_ZEROS}", codes.zeros), (f"{prefix}.{CODE_MINS}", codes.mins)]
    if unpacked.input_perm is not None:
        named.append((f"{prefix}.{INPUT_PERM}", unpacked.input_perm))
    return named


def _is_part(parts: ModuleParts, suffix: str, tensor: torch.Tensor) -> bool:
    if suffix not in parts.all:
        return False
    # naive-quantized stores the codes under ``weight``: only an integer ``weight`` is one.
    return suffix != "weight" or not (tensor.is_floating_point() or tensor.dtype == torch.bool)


def _check_group_size(spec: WeightQuantSpec, prefix: str, unpacked: PermutedCodes) -> None:
    k = unpacked.codes.shape[1]
    expected = spec.group_size_for(k, prefix)
    if unpacked.codes.group_size != expected:
        raise ValueError(f"stored with groups of {unpacked.codes.group_size} inputs, but the "
                         f"quantization_config declares {expected} (K={k})")


def _check_late_g_idx(prefix: str, g_idx: torch.Tensor, in_features: int, group_size: int) -> None:
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"{prefix}.g_idx: expected [{in_features}], got {tuple(g_idx.shape)}")
    if group_permutation(g_idx, group_size) is not None:
        raise ValueError(f"{prefix}.g_idx: input channels are reordered (act-order) but desc_act is false")


def codes_stream(spec: WeightQuantSpec,
                 tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` with each quantized linear's stored parts replaced by its canonical tensors (see the
    module docstring). Raises ``ValueError`` for a part given twice, parts of a linear the config leaves
    dense, a group size other than the declared one, and, after the last tensor, naming every linear with
    missing parts."""
    every = module_parts(spec)
    own: dict[str, ModuleParts] = {}  # prefix -> its scheme's parts
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    awaiting: dict[str, tuple[int, int]] = {}  # done, an optional part still to come: prefix -> (K, G)
    for name, tensor in tensors:
        prefix, _, suffix = name.rpartition(".")
        if not prefix or not _is_part(every, suffix, tensor):
            yield name, tensor
            continue
        if not spec.is_quantized(prefix):
            raise ValueError(f"{name}: a quantized part of a module the quantization_config leaves dense")
        if prefix not in own:
            own[prefix] = module_parts(spec, prefix)
        parts = own[prefix]
        if suffix not in parts.all:
            raise ValueError(f"{name}: not a part of the module's scheme (it stores {sorted(parts.all)})")
        if prefix in done:
            if prefix not in awaiting or suffix not in parts.optional:
                raise ValueError(f"{name}: given twice")
            _check_late_g_idx(prefix, tensor, *awaiting.pop(prefix))
            continue
        stored = pending.setdefault(prefix, {})
        if suffix in stored:
            raise ValueError(f"{name}: given twice")
        stored[suffix] = tensor
        if not parts.required <= stored.keys():
            continue
        del pending[prefix]
        try:
            unpacked = unpack_module(spec, stored, prefix)
            _check_group_size(spec, prefix, unpacked)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from exc
        done.add(prefix)
        if parts.optional - stored.keys():
            awaiting[prefix] = (unpacked.codes.shape[1], unpacked.codes.group_size)
        yield from canonical_tensors(prefix, unpacked)
    if pending:
        missing = {prefix: sorted(own[prefix].required - stored.keys()) for prefix, stored in sorted(pending.items())}
        raise ValueError(f"quantized modules with missing parts: {missing}")
