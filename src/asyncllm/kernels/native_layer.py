"""Decode steps of a few rows through a pre-norm decoder layer written in C (``csrc/decode_layer.c``): the
CPU bundle's ``fused_decode`` capability, one call per layer instead of ~25 torch ops.

At a few rows a layer streams its four weight matrices (~14 MB for SmolLM2-135M) and does a few hundred
floats of other arithmetic; as torch ops, the split GEMVs run near the memory bandwidth but the ~20 small
ops between them (norms, rotary, KV writes, attention, SiLU, residual adds) spend ~5-7 ms per token in
dispatch. The C layer runs everything in one OpenMP region: each thread streams one contiguous column
range of every weight row, and attention reads the paged cache in place through the step's
``DecodeAttentionPlan`` (the one ``paged_attention`` uses).

A layer whose four projections are all weight-only quantized (``PackedWeight``) binds to the C layer's
packed variant (``asyncllm_decode_layer_quant``): each projection quantizes its input rows to int8 blocks
and multiplies them with the packed codes (``csrc/quant_gemv.h``, the kernel of ``native_quant``).

Invariants: the bound pointers are the model's parameters when the binding is made (weights load and are
laid out before the first decode step, and never move afterwards); a bound dense layer stores QKV, output
and gate/up weights K-major and the down projection row-major, all float32 and contiguous in that layout
(``_fits``); a bound packed layer has four contiguous CPU ``PackedWeight``s (``_fits_packed``); any other
layer is left unbound, so it runs as modules; the C code trusts every index it gets, so ``begin`` and
``run`` check each step's tables and tensors first.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from asyncllm.kernels.bundle import FusedLayerWeights
from asyncllm.kernels.kv_cache import KVCache
from asyncllm.kernels.metadata import AttentionMetadata
from asyncllm.kernels.native_attention import DecodeAttentionPlan, native_cache_problem, paged_kv_arg
from asyncllm.kernels.rotary import rotate_half_tables
from asyncllm.quant.packed import PackedWeight

MAX_HEAD_DIM = 512  # the C rotary keeps one head in a stack buffer of this many floats
_ARGTYPES = (
    [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 14 + [ctypes.c_int64] * 9
    + [ctypes.c_float, ctypes.c_int32]
)


class PackedLinearArg(ctypes.Structure):
    """``packed_linear`` of ``csrc/decode_layer.c``: one projection's packed tensors and optional bias;
    ``half_scales`` is 1 when its scales and biases are float16, 0 when float32."""

    _fields_ = [("qweight", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("bits", ctypes.c_int64), ("group_size", ctypes.c_int64),
                ("half_scales", ctypes.c_int64)]


_QUANT_ARGTYPES = (
    [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9
    + [ctypes.c_float, ctypes.c_int32]
)


def _shared_fits(weights: FusedLayerWeights) -> bool:
    """The checks every binding needs: float32 contiguous norms, an even head dim that fits the C buffer."""
    norms = (weights.input_norm, weights.post_norm)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in norms):
        return False
    head_dim = weights.head_dim
    return head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM and weights.num_heads % weights.num_kv_heads == 0


_PARAM_DTYPES = (torch.float32, torch.float16)
"""Scales / biases dtypes the packed C layer reads."""


def _fits_packed(weights: FusedLayerWeights) -> bool:
    """Whether the packed C layer can read this layer: four CPU ``PackedWeight``s of the layer's shapes."""
    projections = weights.projections
    if not _shared_fits(weights) or not all(isinstance(p, PackedWeight) for p in projections):
        return False
    packed = [p for p in projections if isinstance(p, PackedWeight)]
    if any(t.device.type != "cpu" or not t.is_contiguous() for p in packed for t in (p.qweight, p.scales, p.biases)):
        return False
    if any(p.scales.dtype not in _PARAM_DTYPES or p.biases.dtype != p.scales.dtype for p in packed):
        return False
    biases = [b for b in (weights.qkv_bias, weights.o_bias, weights.gate_up_bias, weights.down_bias) if b is not None]
    if any(b.dtype != torch.float32 or not b.is_contiguous() for b in biases):
        return False
    hidden, head_dim = weights.input_norm.shape[0], weights.head_dim
    q_width, inter = weights.num_heads * head_dim, packed[3].in_features
    shapes = ((q_width + 2 * weights.num_kv_heads * head_dim, hidden), (hidden, q_width), (2 * inter, hidden),
              (hidden, inter))
    return all(p.shape == shape for p, shape in zip(packed, shapes, strict=True))


def _fits(weights: FusedLayerWeights) -> bool:
    """Whether the dense C layer can read this layer as it is stored (see the module invariants)."""
    if not all(isinstance(p, torch.Tensor) for p in weights.projections):
        return False
    k_major = (weights.qkv, weights.o, weights.gate_up)
    tensors = [*k_major, weights.down, weights.input_norm, weights.post_norm]
    biases = [b for b in (weights.qkv_bias, weights.o_bias, weights.gate_up_bias, weights.down_bias) if b is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors + biases):
        return False
    if not all(w.t().is_contiguous() for w in k_major) or not weights.down.is_contiguous():
        return False
    head_dim = weights.head_dim
    if head_dim % 2 or head_dim > MAX_HEAD_DIM or weights.num_heads % weights.num_kv_heads:
        return False
    hidden = weights.input_norm.shape[0]
    if weights.qkv.shape != ((weights.num_heads + 2 * weights.num_kv_heads) * head_dim, hidden):
        return False
    return all(b.is_contiguous() for b in biases) and weights.post_norm.is_contiguous() and \
        weights.input_norm.is_contiguous()


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@dataclass(frozen=True)
class LayerFunctions:
    """The C layer's entry points: dense, packed, and the packed scratch size (``None`` if not built)."""

    dense: Callable[..., None]
    packed: Callable[..., None] | None = None
    prepared_bytes: Callable[[int, int, int], int] | None = None


@dataclass(frozen=True)
class _BoundLayer:
    weights: FusedLayerWeights
    args: tuple[object, ...]  # dense: norms, eps and projections; packed: norms, eps, projection structs
    hidden: int
    inter: int
    packed: bool


def _bind(w: FusedLayerWeights, functions: LayerFunctions) -> _BoundLayer | None:
    hidden = int(w.input_norm.shape[0])
    if _fits(w):
        args: tuple[object, ...] = (
            w.input_norm.data_ptr(), w.post_norm.data_ptr(), w.eps,
            *(part for p, b in zip(w.projections, (w.qkv_bias, w.o_bias, w.gate_up_bias, w.down_bias), strict=True)
              for part in (_tensor(p).data_ptr(), _pointer(b))),
        )
        return _BoundLayer(w, args, hidden, int(_tensor(w.down).shape[1]), packed=False)
    if functions.packed is None or not _fits_packed(w):
        return None
    structs = (PackedLinearArg * 4)(*(
        PackedLinearArg(p.qweight.data_ptr(), p.scales.data_ptr(), p.biases.data_ptr(), _pointer(b), p.bits,
                        p.group_size, int(p.scales.dtype == torch.float16))
        for p, b in zip(_packed(w), (w.qkv_bias, w.o_bias, w.gate_up_bias, w.down_bias), strict=True)
    ))
    args = (w.input_norm.data_ptr(), w.post_norm.data_ptr(), w.eps, structs)
    return _BoundLayer(w, args, hidden, _packed(w)[3].in_features, packed=True)


def _tensor(p: torch.Tensor | PackedWeight) -> torch.Tensor:
    if not isinstance(p, torch.Tensor):
        raise ValueError("projection: expected a dense weight")
    return p


def _packed(w: FusedLayerWeights) -> tuple[PackedWeight, ...]:
    packed = tuple(p for p in w.projections if isinstance(p, PackedWeight))
    if len(packed) != 4:
        raise ValueError("projections: expected four packed weights")
    return packed


class NativeDecodeLayers:
    """The fusable layers of one model bound to the C layer (``FusedDecodeBinding``)."""

    def __init__(self, functions: LayerFunctions, layers: Sequence[FusedLayerWeights | None],
                 max_rows: int) -> None:
        self._functions = functions
        self.max_rows = max_rows
        self._prepared_sizes: dict[int, int] = {}
        # each layer's pointers, fixed for the binding's life (the weights never move), so a step does not
        # re-read ~300 data pointers
        self.layers: tuple[_BoundLayer | None, ...] = tuple(
            None if w is None else _bind(w, functions) for w in layers
        )

    def prepared_bytes(self, rows: int) -> int:
        """Scratch bytes the packed layers' activation quantization needs for ``rows`` rows (computed once
        per row count: every decode step asks)."""
        known = self._prepared_sizes.get(rows)
        if known is not None:
            return known
        sizes = [0]
        size_of = self._functions.prepared_bytes
        for bound in self.layers:
            if bound is None or not bound.packed or size_of is None:
                continue
            for p in _packed(bound.weights):
                sizes.append(int(size_of(rows, p.in_features, p.group_size)))
        self._prepared_sizes[rows] = max(sizes)
        return self._prepared_sizes[rows]

    @property
    def num_bound(self) -> int:
        return sum(layer is not None for layer in self.layers)

    def begin(
        self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
        caches: Sequence[KVCache],
    ) -> NativeDecodeStep | None:
        """The step's shared tables, or ``None`` when it does not fit: more rows than ``max_rows``, no native
        attention plan, a padded row (slot ``-1``), or a cache the plan cannot read (another shape or kind,
        see ``native_cache_problem``). Every cache is checked here, once per step."""
        rows = int(positions.shape[0])
        plan = meta.plan
        if not 0 < rows <= self.max_rows or not isinstance(plan, DecodeAttentionPlan):
            return None
        if plan.seq_lens.shape[0] != rows or len(caches) != len(self.layers):
            return None
        if any(native_cache_problem(cache, plan.cache_shape, plan.bits) for cache in caches):
            return None
        slots = meta.slot_mapping
        if slots.device.type != "cpu" or slots.shape != (rows,) or int(slots.min()) < 0:
            return None
        num_blocks, block_size, _, _ = plan.cache_shape
        if int(slots.max()) >= num_blocks * block_size:
            raise ValueError(f"slot_mapping: must lie in [0, {num_blocks * block_size})")
        cos, sin = rotate_half_tables(cos_sin_cache, positions, torch.float32)
        return NativeDecodeStep(self, plan, caches, cos, sin, slots.long().contiguous())


class NativeDecodeStep:
    """One decode step over the bound layers (``FusedDecodeStep``): the caches checked once, shared rotary
    rows, slots and scratch, and the C arguments that every layer of the step repeats."""

    def __init__(self, binding: NativeDecodeLayers, plan: DecodeAttentionPlan, caches: Sequence[KVCache],
                 cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> None:
        self._binding = binding
        self._plan = plan
        self._caches = tuple(caches)
        self._kv_args = tuple(paged_kv_arg(cache) for cache in caches)  # the C view of each layer's cache
        self._tensors = (cos, sin, slots)  # kept alive: the C call reads them through raw pointers
        self._rows = rows = int(slots.shape[0])
        covered = [bound if bound is not None and bound.weights.num_heads == plan.num_heads
                   and cos.shape[1] == bound.weights.head_dim else None for bound in binding.layers]
        self._covered = tuple(covered)
        sizes = [rows * (b.hidden + (b.weights.num_heads + 2 * b.weights.num_kv_heads) * b.weights.head_dim
                         + b.weights.num_heads * b.weights.head_dim + 3 * b.inter + b.weights.num_heads * plan.max_len)
                 for b in covered if b is not None]
        self._work = torch.empty(max(sizes, default=0), dtype=torch.float32)
        self._prepared = torch.empty(binding.prepared_bytes(rows) + 64, dtype=torch.uint8)
        offset = -self._prepared.data_ptr() % 64  # the int8 rows are read with aligned vector loads
        self._prepared_ptr = self._prepared.data_ptr() + offset
        _num_blocks, block_size, _, _ = plan.cache_shape
        self._step_args = (cos.data_ptr(), sin.data_ptr(), slots.data_ptr())
        self._table_args = (plan.block_tables.data_ptr(), plan.seq_lens.data_ptr(), plan.block_tables.shape[1],
                            block_size, plan.max_len, rows)

    def covers(self, layer: int) -> bool:
        return self._covered[layer] is not None

    def run(self, layer: int, residual: torch.Tensor, cache: KVCache) -> None:
        bound = self._covered[layer]
        if bound is None:
            raise ValueError(f"layer: {layer} is not covered by this fused step")
        if residual.shape != (self._rows, bound.hidden) or residual.dtype != torch.float32 \
                or not residual.is_contiguous():
            raise ValueError(f"residual: expected contiguous float32 [{self._rows}, {bound.hidden}], got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        kv = self._kv_args[layer]
        if cache is not self._caches[layer]:
            problem = native_cache_problem(cache, self._plan.cache_shape, self._plan.bits)
            if problem is not None:
                raise ValueError(f"cache: {problem}")
            kv = paged_kv_arg(cache)
        w = bound.weights
        functions = self._binding._functions
        tail = (*self._step_args, ctypes.byref(kv), *self._table_args,
                bound.hidden, w.num_heads, w.num_kv_heads, w.head_dim, bound.inter, w.scale, self._plan.threads)
        if bound.packed and functions.packed is not None:
            functions.packed(residual.data_ptr(), self._work.data_ptr(), self._prepared_ptr, *bound.args, *tail)
        else:
            functions.dense(residual.data_ptr(), self._work.data_ptr(), *bound.args, *tail)


def bind_layer_functions(library: ctypes.CDLL) -> LayerFunctions:
    """The C entry points with their argument types declared (the packed ones only where the library has
    them)."""
    dense = library.asyncllm_decode_layer
    dense.restype = None
    dense.argtypes = _ARGTYPES
    packed = getattr(library, "asyncllm_decode_layer_quant", None)
    size_of = getattr(library, "asyncllm_quant_prepared_bytes", None)
    if packed is None or size_of is None:
        return LayerFunctions(dense)
    packed.restype = None
    packed.argtypes = _QUANT_ARGTYPES
    size_of.restype = ctypes.c_int64
    size_of.argtypes = [ctypes.c_int64] * 3
    return LayerFunctions(dense, packed, size_of)
