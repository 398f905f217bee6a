"""Linear layers (plain and merged: fused QKV, fused gate/up) and the linear-method seam.

A linear layer owns the logical shapes (``input_size``, ``output_sizes``, one per merged shard), the bias
and the checkpoint-loading hook. *How* the weight is stored and multiplied belongs to its
``LinearMethod``:

- ``create_weights(layer, dtype=, device=)`` registers the parameters that hold the weight on ``layer``
  (the unquantized method: ``weight`` ``[N, K]``; a quantized one e.g. ``qweight`` / ``scales`` /
  ``qzeros`` / ``g_idx``), each tagged with ``output_dim`` (the dimension that indexes output features, or
  ``None`` for a tensor every shard shares) and ``output_pack`` (output features per stored element along
  that dimension, e.g. 8 for int4 packed into int32 along N);
- ``process_weights_after_loading(layer)`` runs once after every checkpoint tensor is in place, to repack
  for the device's kernel (the unquantized method applies the bundle's ``prepare_weight``: K-major on CPU);
- ``apply(layer, x, bias)`` computes ``x @ W.T + bias`` for ``x`` ``[T, K]``.

Merged layers stack several checkpoint matrices along the output dimension, in ``shard_ids`` order, and
each arrives separately: ``weight_loader(param, full_tensor, shard_id)`` copies it into the slice
``sum(output_sizes[:i]) / output_pack`` of length ``output_sizes[i] / output_pack`` along the parameter's
``output_dim``; a parameter without one (``None``) must be identical for every shard and is copied whole.
A per-group parameter tagged ``expand_groups`` also accepts a shard stored with coarser groups.
This is the whole contract a quantized method keeps: name its parameters as the checkpoint does, tag them,
and the merged QKV / gate-up shards load without the model knowing the format.

Tensor parallelism (``parallel`` with more than one rank) is the layer's job too, done at loading: the
layer's ``input_size`` / ``output_sizes`` are the rank's *local* sizes (``full_input_size`` /
``full_output_sizes`` the checkpoint's), the method creates local parameters from them, and
``weight_loader`` keeps only the rank's slice of each full checkpoint tensor. ``split="column"``: each
shard's output rows are split (``output_ranges``: the rank's ``(start, length)`` of every shard, evenly by
default, per head for ``QKVLinear``); ``split="row"``: the input features are split evenly and ``forward``
sums the ranks' partial products (one all-reduce) before adding the bias once. A row split slices every
parameter tagged with an ``input_dim`` along it (whole groups for per-group scales); a parameter tagged
``input_shardable=False`` (an input permutation) cannot be split and the layer refuses with
``ValueError`` naming ``tensor_parallel_size``, as it does when a split does not divide.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from asyncllm.distributed.parallel_state import SINGLE, TensorParallel, even_range, head_partition
from asyncllm.kernels.bundle import KernelOps
from asyncllm.layers.weights import ShardId, copy_checked, empty_parameter

Split = Literal["column", "row"]


class LinearMethod(Protocol):
    """How a linear layer's weight is stored and applied (see the module docstring)."""

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device) -> None: ...

    def process_weights_after_loading(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


def tag_parameter(
    param: nn.Parameter, *, output_dim: int | None, output_pack: int = 1, expand_groups: bool = False,
    input_dim: int | None = None, input_shardable: bool = True,
) -> nn.Parameter:
    """Record how ``weight_loader`` slices ``param`` per merged shard (see the module docstring);
    ``expand_groups``: a 2-D per-group parameter that accepts a shard stored with coarser groups (its columns
    are repeated to this parameter's group count, which leaves the weight's values unchanged).
    ``input_dim``: the dimension that indexes input features (or their groups), sliced by a row split;
    ``None``: the parameter is the same on every rank. ``input_shardable=False``: the parameter refers to
    input features by value (a permutation), so a row split cannot slice it."""
    param.output_dim = output_dim  # type: ignore[attr-defined]
    param.output_pack = output_pack  # type: ignore[attr-defined]
    param.expand_groups = expand_groups  # type: ignore[attr-defined]
    param.input_dim = input_dim  # type: ignore[attr-defined]
    param.input_shardable = input_shardable  # type: ignore[attr-defined]
    return param


def _load_shared(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
    """Copy a tensor every shard carries whole (e.g. an input permutation); a shard whose copy differs from
    an earlier shard's raises ``ValueError`` (the merged layer can hold only one)."""
    first: ShardId | None = getattr(param, "loaded_by", None)
    if first is not None and (tuple(loaded.shape) != tuple(param.shape) or not torch.equal(param.data, loaded.to(
            param.dtype))):
        raise ValueError(f"shard {shard_id!r}: differs from shard {first!r}, and the merged layer holds one copy")
    copy_checked(param.data, loaded, f"shard {shard_id!r}")
    if first is None:
        param.loaded_by = shard_id  # type: ignore[attr-defined]


def _expanded_groups(param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
    """``loaded`` repeated along dim 1 to ``param``'s column count when ``param`` is tagged ``expand_groups``
    and that count is a whole multiple of the loaded one; otherwise ``loaded`` (the shape check follows)."""
    if not getattr(param, "expand_groups", False) or loaded.dim() != 2 or param.dim() != 2:
        return loaded
    have, want = int(loaded.shape[1]), int(param.shape[1])
    if have == want or have == 0 or want % have:
        return loaded
    return loaded.repeat_interleave(want // have, dim=1)


class UnquantizedLinearMethod:
    """A dense ``weight`` ``[N, K]`` in the model dtype, multiplied by the bundle's ``linear``; after loading
    it is stored as the bundle's ``prepare_weight`` lays it out (same values, maybe K-major)."""

    def __init__(self, ops: KernelOps) -> None:
        self.ops = ops

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device) -> None:
        weight = empty_parameter(layer.output_size, layer.input_size, dtype=dtype, device=device)
        layer.weight = tag_parameter(weight, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer: Linear) -> None:
        laid_out = self.ops.prepare_weight(layer.weight.data)
        if laid_out is not layer.weight.data:
            layer.weight = tag_parameter(nn.Parameter(laid_out, requires_grad=False), output_dim=0)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.ops.linear(x, layer.weight, bias)


class Linear(nn.Module):
    """``y = x @ W.T + bias`` over ``output_sizes`` stacked shards (one, ``shard_id=None``, for a plain
    linear). Invariant: ``output_size == sum(output_sizes)``; shard ``i`` owns output rows
    ``sum(output_sizes[:i]) : sum(output_sizes[:i + 1])``. Under tensor parallelism (see the module
    docstring) these are the rank's local sizes; without it they equal the full ones."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        method: LinearMethod,
        dtype: torch.dtype,
        device: torch.device,
        output_sizes: Sequence[int] | None = None,
        parallel: TensorParallel = SINGLE,
        split: Split | None = None,
        output_ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        sizes = tuple(output_sizes) if output_sizes is not None else (output_size,)
        if input_size <= 0 or not sizes or any(size <= 0 for size in sizes):
            raise ValueError(f"input_size/output_sizes: must be positive, got {input_size}, {sizes}")
        if sum(sizes) != output_size:
            raise ValueError(f"output_sizes: {sizes} do not add up to output_size={output_size}")
        if split not in (None, "column", "row"):
            raise ValueError(f"split: must be None, 'column' or 'row', got {split!r}")
        self.full_input_size = input_size
        self.full_output_sizes = sizes
        self.parallel = parallel if split is not None else SINGLE
        self.tp_split = split if self.parallel.is_parallel else None
        self.input_range = (0, input_size)
        self.output_ranges = tuple((0, size) for size in sizes)
        if self.tp_split == "row":
            self.input_range = even_range(input_size, self.parallel, f"the input size of a {input_size}->"
                                                                     f"{output_size} linear")
        elif self.tp_split == "column":
            self.output_ranges = tuple(output_ranges) if output_ranges is not None else tuple(
                even_range(size, self.parallel, f"the output size of a {input_size}->{size} linear") for size in sizes)
        if len(self.output_ranges) != len(sizes) or any(
                start < 0 or length <= 0 or start + length > size
                for (start, length), size in zip(self.output_ranges, sizes, strict=False)):
            raise ValueError(f"output_ranges: {self.output_ranges} are not one range inside each shard of {sizes}")
        self.input_size = self.input_range[1]
        self.output_sizes = tuple(length for _, length in self.output_ranges)
        self.output_size = sum(self.output_sizes)
        self.method = method
        try:
            method.create_weights(self, dtype=dtype, device=device)
        except ValueError as error:
            if not self.parallel.is_parallel:
                raise
            raise ValueError(f"tensor_parallel_size: {self.parallel.size} splits a {input_size}->{output_size} "
                             f"linear into {self.input_size}->{self.output_size} per rank, which its "
                             f"{type(method).__name__} cannot store: {error}") from error
        if self.tp_split == "row":
            for name, param in self.named_parameters(recurse=False):
                if not getattr(param, "input_shardable", True):
                    raise ValueError(f"tensor_parallel_size: {self.parallel.size} would split the input features "
                                     f"of a {input_size}->{output_size} linear, but its {name!r} permutes them "
                                     f"(e.g. GPTQ act-order); serve it on one rank")
        self.bias: nn.Parameter | None
        if bias:
            self.bias = tag_parameter(empty_parameter(self.output_size, dtype=dtype, device=device), output_dim=0)
        else:
            self.register_parameter("bias", None)

    def shard_index(self, shard_id: ShardId) -> int:
        """Position of ``shard_id`` in ``shard_ids``; unknown ids raise ``ValueError``."""
        if shard_id not in self.shard_ids:
            raise ValueError(f"shard_id: expected one of {self.shard_ids}, got {shard_id!r}")
        return self.shard_ids.index(shard_id)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        """Copy the rank's slice of the full checkpoint tensor ``loaded`` (shard ``shard_id``) into ``param``."""
        index = self.shard_index(shard_id)
        loaded = _expanded_groups(param, self._input_slice(param, loaded, shard_id))
        dim: int | None = getattr(param, "output_dim", None)
        if dim is None:
            _load_shared(param, loaded, shard_id)
            self._loaded(param, shard_id)
            return
        pack: int = getattr(param, "output_pack", 1)
        offset, size = sum(self.output_sizes[:index]), self.output_sizes[index]
        if offset % pack or size % pack:
            raise ValueError(f"shard {shard_id!r}: {size} outputs at {offset} are not a multiple of the packing {pack}")
        if self.tp_split == "column":
            start, length = self.output_ranges[index]
            if start % pack or length % pack:
                raise ValueError(f"tensor_parallel_size: {self.parallel.size} gives rank {self.parallel.rank} "
                                 f"outputs {start}..{start + length} of shard {shard_id!r}, which splits a pack of "
                                 f"{pack}")
            full = self.full_output_sizes[index] // pack
            if loaded.dim() <= dim or loaded.shape[dim] != full:
                raise ValueError(f"shard {shard_id!r}: checkpoint tensor has shape {tuple(loaded.shape)}, expected "
                                 f"{full} rows along dim {dim}")
            loaded = loaded.narrow(dim, start // pack, length // pack)
        copy_checked(param.data.narrow(dim, offset // pack, size // pack), loaded, f"shard {shard_id!r}")
        self._loaded(param, shard_id)

    def _input_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> torch.Tensor:
        """Under a row split, the rank's share of ``loaded`` along the parameter's ``input_dim`` (whole
        groups: ``ValueError`` naming ``tensor_parallel_size`` when they do not divide); else ``loaded``."""
        dim: int | None = getattr(param, "input_dim", None)
        if self.tp_split != "row" or dim is None:
            return loaded
        if loaded.dim() <= dim:
            raise ValueError(f"shard {shard_id!r}: checkpoint tensor has shape {tuple(loaded.shape)}, expected an "
                             f"input dimension {dim}")
        full = int(loaded.shape[dim])
        if full % self.parallel.size:
            raise ValueError(f"tensor_parallel_size: {self.parallel.size} does not divide the {full} input "
                             f"columns (or groups) of shard {shard_id!r} of a {self.full_input_size}->"
                             f"{sum(self.full_output_sizes)} linear")
        share = full // self.parallel.size
        return loaded.narrow(dim, self.parallel.rank * share, share)

    def _loaded(self, param: nn.Parameter, shard_id: ShardId) -> None:
        """Tell a method that repacks early (``weight_loaded``) that a checkpoint slice arrived."""
        hook = getattr(self.method, "weight_loaded", None)
        if hook is not None:
            hook(self, param, shard_id)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_split != "row":
            return self.method.apply(self, x, self.bias)
        out = self.parallel.all_reduce(self.method.apply(self, x, None))
        return out if self.bias is None else out.add_(self.bias)

    def forward_unreduced(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` without the row split's all-reduce: this rank's partial product, with the bias on
        rank 0 only, so that the sum over the ranks is ``forward(x)``. The same as ``forward`` without a row
        split. A caller that sums several row-split outputs (scaled by factors every rank shares) calls this
        and all-reduces once."""
        if self.tp_split != "row":
            return self.method.apply(self, x, self.bias)
        out = self.method.apply(self, x, None)
        return out if self.bias is None or self.parallel.rank != 0 else out.add_(self.bias)

    def extra_repr(self) -> str:
        method = type(self.method).__name__
        parallel = self.parallel
        split = "" if self.tp_split is None else f", split={self.tp_split}, rank={parallel.rank}/{parallel.size}"
        return f"in={self.input_size}, out={self.output_sizes}, bias={self.bias is not None}, method={method}{split}"


class MergedColumnLinear(Linear):
    """Several linears over the same input, fused along the output dim: shards ``0 .. n-1`` in order.
    With ``parallel``, column-split: each rank holds its even share of every shard (``output_ranges``)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool,
        method: LinearMethod,
        dtype: torch.dtype,
        device: torch.device,
        parallel: TensorParallel = SINGLE,
        output_ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if not output_sizes or any(size <= 0 for size in output_sizes):
            raise ValueError(f"output_sizes: must be a non-empty list of positive sizes, got {output_sizes}")
        super().__init__(input_size, sum(output_sizes), bias=bias, method=method, dtype=dtype, device=device,
                         output_sizes=output_sizes, parallel=parallel, split="column", output_ranges=output_ranges)
        self.shard_ids = tuple(range(len(output_sizes)))


class QKVLinear(MergedColumnLinear):
    """Fused query/key/value projection: shard ``"q"`` is ``Hq * D`` rows, ``"k"`` and ``"v"`` ``Hk * D``.

    With ``parallel``, each rank holds its heads (``parallel_state.head_partition``): ``num_heads`` /
    ``num_kv_heads`` are then the rank's local counts, key/value heads replicated when there are fewer of
    them than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool,
        method: LinearMethod,
        dtype: torch.dtype,
        device: torch.device,
        parallel: TensorParallel = SINGLE,
    ) -> None:
        part = head_partition(num_heads, num_kv_heads, parallel)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        kv_range = (part.kv_start * head_dim, part.num_kv_heads * head_dim)
        super().__init__(hidden_size, (q_size, kv_size, kv_size), bias=bias, method=method, dtype=dtype,
                         device=device, parallel=parallel,
                         output_ranges=((part.q_start * head_dim, part.num_heads * head_dim), kv_range, kv_range))
        self.shard_ids = ("q", "k", "v")
        self.head_dim = head_dim
        self.num_heads = part.num_heads
        self.num_kv_heads = part.num_kv_heads

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copy) of this layer's ``[T, (Hq + 2 Hk) * D]`` output as ``[T, H, D]`` q, k, v."""
        q, k, v = qkv.split(self.output_sizes, dim=-1)
        return (
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
        )


def dense_weight(layer: Linear) -> torch.Tensor | None:
    """The layer's dense ``[N, K]`` weight when its method is exactly the unquantized one, else ``None``: what
    a fused kernel that multiplies dense weights may read (a subclass may compute something else)."""
    return layer.weight if type(layer.method) is UnquantizedLinearMethod else None
