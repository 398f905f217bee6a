"""A Hugging Face ``config.json`` ``quantization_config`` as the weight-only scheme the loaders unpack.

``parse_quantization_config`` accepts three checkpoint formats and refuses everything else with a
``ValueError`` naming the offending field and value:

* ``"awq"`` (AutoAWQ ``WQLinear_GEMM``): 4-bit, grouped, asymmetric (``qzeros`` always stored).
* ``"gptq"`` (AutoGPTQ / GPTQModel / optimum ``QuantLinear``): 4 or 8 bits, symmetric or not, optional
  act-order (``desc_act``); ``checkpoint_format`` ``"gptq"`` (zero points stored minus one) or ``"gptq_v2"``.
* ``"compressed-tensors"`` (llm-compressor): integer weight-only schemes stored ``pack-quantized``
  (or ``naive-quantized`` / ``int-quantized``: one int8 per value), ``group`` or ``channel`` strategy.

Invariants of ``WeightQuantSpec``: ``bits`` is 4 or 8 (AWQ: 4); ``group_size`` is a positive multiple of 16
or ``None`` (one group per output row: ``G = K``); ``storage`` names the tensor layout inside the method.

A compressed-tensors config may give its ``config_groups`` different weight settings (code width, group
size, symmetry, act-order, storage): each quantized linear then takes the settings of the group whose
targets match its name (``WeightQuantSpec.scheme_for``), matched as compressed-tensors does (a name target,
exact or ``re:``, before the ``Linear`` class). Refused: one target string in groups with different
settings, and (at load) a module whose name matches targets of groups with different settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

QuantMethod = Literal["awq", "gptq", "compressed-tensors"]

AWQ_STORAGE = ("gemm",)
GPTQ_STORAGE = ("gptq", "gptq_v2")
CT_STORAGE = ("pack-quantized", "naive-quantized", "int-quantized")
_CT_ACT_ORDER = ("group", "dynamic")
_CT_NO_ACT_ORDER = ("weight", "static")
_LINEAR_TARGET = "Linear"


@dataclass(frozen=True)
class WeightScheme:
    """The storage of one quantized linear: code width, groups (``None``: one per output row), whether a
    zero point is stored (``symmetric`` false), act-order (``desc_act``: a ``g_idx`` that may permute the
    inputs) and the format's tensor layout (``storage``)."""

    bits: int
    group_size: int | None
    symmetric: bool
    desc_act: bool
    storage: str

    def group_size_for(self, in_features: int) -> int:
        """The group size ``G`` of a linear with ``in_features`` inputs (``K`` when channel-wise)."""
        return in_features if self.group_size is None else self.group_size


@dataclass(frozen=True)
class TargetedScheme:
    """A compressed-tensors config group: the ``WeightScheme`` of the linears its ``targets`` name."""

    name: str
    targets: tuple[str, ...]
    scheme: WeightScheme


@dataclass(frozen=True)
class WeightQuantSpec:
    """How a checkpoint stores its weight-only quantized linears.

    ``dense_modules``: for AWQ, substrings of module names left dense (``modules_to_not_convert``, matched
    as transformers and vLLM do); for compressed-tensors, the ``ignore`` list (exact names or ``re:``
    regexes, matched from the start of the name). ``targets`` (compressed-tensors): ``"Linear"`` quantizes
    every linear not ignored, other entries are exact names or ``re:`` regexes. ``block_modules`` (GPTQ
    ``modules_in_block_to_quantize``, flattened): when set, only linears whose name ends with one of them
    are quantized. ``quantize_lm_head``: whether ``lm_head`` is quantized (AWQ never; GPTQ ``lm_head``;
    compressed-tensors by its targets and ignore list). ``desc_act``: GPTQ act-order / compressed-tensors
    ``actorder: "group"``: each linear carries a ``g_idx`` that may permute its input channels.

    ``groups`` (compressed-tensors): the config groups when their weight settings differ, else empty. With
    several groups the top-level ``bits`` / ``group_size`` / ``symmetric`` / ``desc_act`` / ``storage`` are
    the first group's; per module, ask ``scheme_for(prefix)`` (what every loader does).
    """

    method: QuantMethod
    bits: int
    group_size: int | None
    symmetric: bool
    desc_act: bool
    storage: str
    dense_modules: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    block_modules: tuple[str, ...] | None = None
    quantize_lm_head: bool = False
    groups: tuple[TargetedScheme, ...] = ()

    @property
    def scheme(self) -> WeightScheme:
        """The top-level settings as a ``WeightScheme`` (with several ``groups``: the first group's)."""
        return WeightScheme(self.bits, self.group_size, self.symmetric, self.desc_act, self.storage)

    @property
    def schemes(self) -> tuple[WeightScheme, ...]:
        """Every distinct ``WeightScheme`` a quantized linear of this checkpoint may have."""
        if not self.groups:
            return (self.scheme,)
        return tuple(dict.fromkeys(group.scheme for group in self.groups))

    def group_size_for(self, in_features: int, prefix: str | None = None) -> int:
        """The group size ``G`` of the linear at ``prefix`` with ``in_features`` inputs (``K`` when
        channel-wise). ``prefix`` may be left out when every quantized linear shares one scheme."""
        if prefix is None:
            if self.groups:
                raise ValueError("group_size_for: the config groups differ in their settings; pass the module prefix")
            return self.scheme.group_size_for(in_features)
        scheme = self.scheme_for(prefix)
        if scheme is None:
            raise ValueError(f"{prefix}: not a quantized linear of this checkpoint")
        return scheme.group_size_for(in_features)

    def scheme_for(self, prefix: str) -> WeightScheme | None:
        """The storage of the linear at checkpoint module name ``prefix``, ``None`` when it is dense. With
        several config groups: the group a name target (exact or ``re:``) of which matches, else the group
        targeting the ``Linear`` class; ``ValueError`` when name targets of groups with different settings
        both match."""
        if not self.is_quantized(prefix):
            return None
        if not self.groups:
            return self.scheme
        named = {group.name: group.scheme for group in self.groups
                 if any(t != _LINEAR_TARGET and _ct_match(prefix, t) for t in group.targets)}
        if len(set(named.values())) > 1:
            raise ValueError(f"{prefix}: matched by the targets of config_groups {sorted(named)}, whose weight "
                             "settings differ")
        if named:
            return next(iter(named.values()))
        classed = [group.scheme for group in self.groups if _LINEAR_TARGET in group.targets]
        return classed[0]

    def is_quantized(self, prefix: str) -> bool:
        """Whether the linear at checkpoint module name ``prefix`` (``model.layers.0.self_attn.q_proj``,
        unmerged) is stored quantized; only meaningful for linear layers."""
        if self.method == "compressed-tensors":
            if any(_ct_match(prefix, pattern) for pattern in self.dense_modules):
                return False
            return any(target == _LINEAR_TARGET or _ct_match(prefix, target) for target in self.targets)
        if _is_lm_head(prefix) and not self.quantize_lm_head:
            return False
        if self.method == "awq":
            return not any(name in prefix for name in self.dense_modules)
        if self.block_modules is not None and not _is_lm_head(prefix):
            return any(prefix == name or prefix.endswith("." + name) for name in self.block_modules)
        return True


def _is_lm_head(prefix: str) -> bool:
    return prefix == "lm_head" or prefix.endswith(".lm_head")


def _ct_match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern


def quant_spec_from_hf_config(hf_config: Mapping[str, Any]) -> WeightQuantSpec | None:
    """The spec of a ``config.json`` dict, or ``None`` when it has no ``quantization_config``."""
    config = hf_config.get("quantization_config")
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise ValueError(f"quantization_config: expected an object, got {type(config).__name__}")
    return parse_quantization_config(config)


def parse_quantization_config(config: Mapping[str, Any]) -> WeightQuantSpec:
    """Validate a ``quantization_config`` dict into a ``WeightQuantSpec`` (see the module docstring)."""
    method = config.get("quant_method")
    normalized = method.lower() if isinstance(method, str) else method
    if normalized == "awq":
        return _parse_awq(config)
    if normalized == "gptq":
        return _parse_gptq(config)
    if normalized == "compressed-tensors":
        return _parse_compressed_tensors(config)
    raise ValueError(f"quantization_config.quant_method: unsupported {method!r}; expected 'awq', 'gptq' or "
                     "'compressed-tensors'")


def _fail(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"quantization_config.{field}: unsupported {value!r}; expected {expected}")


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> tuple[str, Any]:
    """The first of ``names`` present in ``config`` (with its value), else ``(names[0], default)``."""
    for name in names:
        if name in config:
            return name, config[name]
    return names[0], default


def _bool(config: Mapping[str, Any], name: str, default: bool) -> bool:
    value = config.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _bits(config: Mapping[str, Any], allowed: tuple[int, ...], *names: str) -> int:
    field, value = _get(config, *names)
    if isinstance(value, bool) or value not in allowed:
        raise _fail(field, value, f"one of {list(allowed)}")
    return int(value)


def _group_size(field: str, value: Any, *, allow_channel: bool = True) -> int | None:
    """``-1`` / ``None`` (when allowed) mean one group per row; others must be positive multiples of 16."""
    if allow_channel and (value is None or value == -1):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 16:
        expected = "a positive multiple of 16" + (" or -1 (channel-wise)" if allow_channel else "")
        raise _fail(field, value, expected)
    return value


def _names(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise _fail(field, value, "a list of module names")
    return tuple(value)


def _parse_awq(config: Mapping[str, Any]) -> WeightQuantSpec:
    bits = _bits(config, (4,), "bits", "w_bit")
    field, value = _get(config, "group_size", "q_group_size", default=128)
    group_size = _group_size(field, value)
    field, version = _get(config, "version", default="gemm")
    if not isinstance(version, str) or version.lower() not in AWQ_STORAGE:
        raise _fail(field, version, "'gemm' (the AutoAWQ GEMM layout)")
    backend = config.get("backend")
    if backend is not None and backend != "autoawq":
        raise _fail("backend", backend, "'autoawq' (llm-awq checkpoints use another layout)")
    zero_point = _bool(config, "zero_point", True)
    dense = _names("modules_to_not_convert", config.get("modules_to_not_convert"))
    return WeightQuantSpec("awq", bits, group_size, symmetric=not zero_point, desc_act=False, storage="gemm",
                           dense_modules=dense)


def _parse_gptq(config: Mapping[str, Any]) -> WeightQuantSpec:
    bits = _bits(config, (4, 8), "bits")
    group_size = _group_size("group_size", config.get("group_size", 128))
    if _bool(config, "is_marlin_format", False):
        raise _fail("is_marlin_format", True, "false (Marlin-repacked GPTQ weights are not supported)")
    storage = "gptq"
    for field in ("checkpoint_format", "format"):
        value = config.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or value.lower() not in GPTQ_STORAGE:
            raise _fail(field, value, f"one of {list(GPTQ_STORAGE)}")
        storage = value.lower()
    pack_dtype = config.get("pack_dtype")
    if pack_dtype is not None and str(pack_dtype).removeprefix("torch.") != "int32":
        raise _fail("pack_dtype", pack_dtype, "'int32'")
    method = config.get("method")
    if method is not None and str(method).lower() != "gptq":
        raise _fail("method", method, "'gptq'")
    dynamic = config.get("dynamic")
    if dynamic:
        raise _fail("dynamic", dynamic, "null or {} (per-module overrides are not supported)")
    block = config.get("modules_in_block_to_quantize")
    block_modules: tuple[str, ...] | None = None
    if block is not None:
        if not isinstance(block, Sequence) or isinstance(block, str):
            raise _fail("modules_in_block_to_quantize", block, "a list of lists of module names")
        flat: list[str] = []
        for entry in block:
            flat.extend(_names("modules_in_block_to_quantize", [entry] if isinstance(entry, str) else entry))
        block_modules = tuple(flat)
    return WeightQuantSpec("gptq", bits, group_size, symmetric=_bool(config, "sym", True),
                           desc_act=_bool(config, "desc_act", False), storage=storage,
                           block_modules=block_modules, quantize_lm_head=_bool(config, "lm_head", False))


def _ct_weights(group: str, scheme: Mapping[str, Any]) -> tuple[int, int | None, bool, bool]:
    """(bits, group_size, symmetric, act_order) of one compressed-tensors scheme's ``weights``."""
    where = f"config_groups.{group}"
    for field in ("input_activations", "output_activations"):
        if scheme.get(field) is not None:
            raise _fail(f"{where}.{field}", scheme[field], "null (only weight-only quantization is supported)")
    weights = scheme.get("weights")
    if not isinstance(weights, Mapping):
        raise _fail(f"{where}.weights", weights, "an object (weight quantization arguments)")
    where = f"{where}.weights"
    bits = _bits(weights, (4, 8), "num_bits")
    kind = weights.get("type", "int")
    if not isinstance(kind, str) or kind.lower() != "int":
        raise _fail(f"{where}.type", kind, "'int'")
    if weights.get("dynamic") not in (None, False):
        raise _fail(f"{where}.dynamic", weights["dynamic"], "false")
    if weights.get("block_structure") is not None:
        raise _fail(f"{where}.block_structure", weights["block_structure"], "null")
    raw_group = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None:
        strategy = "group" if isinstance(raw_group, int) and raw_group > 0 else "channel" if raw_group == -1 else None
    strategy = strategy.lower() if isinstance(strategy, str) else strategy
    if strategy == "group":
        group_size = _group_size(f"{where}.group_size", raw_group, allow_channel=False)
    elif strategy == "channel":
        if raw_group not in (None, -1):
            raise _fail(f"{where}.group_size", raw_group, "null or -1 with strategy 'channel'")
        group_size = None
    else:
        raise _fail(f"{where}.strategy", weights.get("strategy"), "'group' or 'channel'")
    symmetric = _bool(weights, "symmetric", True)
    actorder = weights.get("actorder")
    if actorder is None or actorder is False or (isinstance(actorder, str) and actorder.lower() in _CT_NO_ACT_ORDER):
        act_order = False
    elif actorder is True or (isinstance(actorder, str) and actorder.lower() in _CT_ACT_ORDER):
        act_order = True
    else:
        raise _fail(f"{where}.actorder", actorder, f"null or one of {[*_CT_NO_ACT_ORDER, *_CT_ACT_ORDER]}")
    return bits, group_size, symmetric, act_order


def _ct_format(field: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in CT_STORAGE:
        raise _fail(field, value, f"one of {list(CT_STORAGE)}")
    return value.lower()


def _empty_or_dense(config: Mapping[str, Any], field: str, expected: str) -> None:
    value = config.get(field)
    if not value:
        return
    if field == "sparsity_config" and isinstance(value, Mapping) and value.get("format") == "dense":
        return
    raise _fail(field, value, expected)


def _parse_compressed_tensors(config: Mapping[str, Any]) -> WeightQuantSpec:
    if config.get("kv_cache_scheme") is not None:
        raise _fail("kv_cache_scheme", config["kv_cache_scheme"], "null (KV-cache quantization is not supported)")
    _empty_or_dense(config, "sparsity_config", "null, {} or format 'dense'")
    _empty_or_dense(config, "transform_config", "null or {} (weight transforms are not supported)")
    _empty_or_dense(config, "moe_sparsity_config", "null")
    top_format = config.get("format")
    groups = config.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise _fail("config_groups", groups, "a non-empty object of quantization schemes")
    settings: dict[str, WeightScheme] = {}
    targets: list[str] = []
    by_target: dict[str, str] = {}
    for name, scheme in groups.items():
        if not isinstance(scheme, Mapping):
            raise _fail(f"config_groups.{name}", scheme, "a scheme object (preset names are not supported)")
        scheme_format = scheme.get("format")
        if scheme_format is not None:
            fmt = _ct_format(f"config_groups.{name}.format", scheme_format)
        else:
            fmt = _ct_format("format", top_format)
        bits, group_size, symmetric, act_order = _ct_weights(name, scheme)
        settings[name] = WeightScheme(bits, group_size, symmetric, act_order, fmt)
        scheme_targets = _names(f"config_groups.{name}.targets", scheme.get("targets"))
        if not scheme_targets:
            raise _fail(f"config_groups.{name}.targets", scheme.get("targets"), "a non-empty list")
        for target in scheme_targets:
            other = by_target.setdefault(target, name)
            if settings[other] != settings[name]:
                raise _fail(f"config_groups.{name}.targets", list(scheme_targets),
                            f"targets not shared with config_groups.{other}, whose weight settings differ")
        targets.extend(scheme_targets)
    if top_format is not None and top_format != "mixed-precision":
        _ct_format("format", top_format)
    first = next(iter(settings.values()))
    mixed = len(set(settings.values())) > 1
    ct_groups = tuple(TargetedScheme(name, _names(f"config_groups.{name}.targets", groups[name].get("targets")),
                                     scheme) for name, scheme in settings.items()) if mixed else ()
    ignore = _names("ignore", config.get("ignore"))
    return WeightQuantSpec("compressed-tensors", first.bits, first.group_size, symmetric=first.symmetric,
                           desc_act=first.desc_act, storage=first.storage, dense_modules=ignore,
                           targets=tuple(targets), groups=ct_groups,
                           quantize_lm_head=not any(_ct_match("lm_head", pattern) for pattern in ignore)
                           and any(t == _LINEAR_TARGET or _ct_match("lm_head", t) for t in targets))
