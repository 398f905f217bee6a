"""The linear method of weight-only quantized layers, and the code parameters it shares with embeddings.

Loading: a quantized module receives its weight as the format-neutral codes the loaders emit for every
format (``quant.packed.QuantCodes``, one tensor each): ``codes`` uint8 ``[N, K]``, ``code_scales`` /
``code_zeros`` / ``code_mins`` float32 ``[N, K / G]`` and, for GPTQ act-order, ``input_perm`` int64 ``[K]``
(the layer computes ``x[:, input_perm] @ W.T``). All are tagged ``output_dim=0``, so a merged layer's
shards land in their row ranges like dense weights; the group parameters of a shard stored with coarser
groups than the merged layer's are repeated to its groups on load (values unchanged).

As soon as every code parameter of every shard has arrived (``CodeLoadTracker``; at the latest in
``process_weights_after_loading``) the codes are checked to fit the declared width, packed
(``quant.packed.pack``) and dropped: only the packed tensors stay (``qweight``, ``qscales``, ``qbiases``, as
frozen parameters so memory accounting sees them). Packing module by module keeps a load's peak memory
near the packed size instead of the size of the whole model's one-byte codes. ``apply`` calls the
bundle's ``quantized_linear``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from asyncllm.layers.linear import tag_parameter
from asyncllm.layers.weights import empty_parameter
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import PackedWeight, QuantCodes, pack

if TYPE_CHECKING:
    from asyncllm.kernels.bundle import KernelOps
    from asyncllm.layers.linear import Linear

CODE_PARAMETERS = ("codes", "code_scales", "code_zeros", "code_mins")
PACKED_PARAMETERS = ("qweight", "qscales", "qbiases")


def create_code_parameters(module: nn.Module, rows: int, cols: int, quant: LayerQuant, device: torch.device) -> None:
    """Register the (uninitialised) code parameters of a ``[rows, cols]`` weight stored as ``quant``."""
    groups = quant.groups(cols)
    module.codes = tag_parameter(empty_parameter(rows, cols, dtype=torch.uint8, device=device), output_dim=0,
                                 input_dim=1)
    # per-group parameters split with their groups; channel-wise ones (one group) are the same on every rank
    group_dim = 1 if quant.group_size is not None else None
    for name in CODE_PARAMETERS[1:]:
        param = empty_parameter(rows, groups, dtype=torch.float32, device=device)
        setattr(module, name, tag_parameter(param, output_dim=0, expand_groups=True, input_dim=group_dim))
    if quant.permuted:
        module.input_perm = tag_parameter(empty_parameter(cols, dtype=torch.int64, device=device), output_dim=None,
                                          input_shardable=False)


class CodeLoadTracker:
    """Which ``(code parameter, shard)`` pairs of one module are still to be loaded."""

    def __init__(self, module: nn.Module, shard_ids: tuple[object, ...]) -> None:
        names = [name for name in (*CODE_PARAMETERS, "input_perm") if hasattr(module, name)]
        self._params = {id(getattr(module, name)): name for name in names}
        self._pending = {(name, shard) for name in names for shard in shard_ids}

    def loaded(self, param: nn.Parameter, shard_id: object) -> bool:
        """Record that ``param``'s ``shard_id`` slice arrived; ``True`` once nothing is pending."""
        name = self._params.get(id(param))
        if name is not None:
            self._pending.discard((name, shard_id))
        return not self._pending


def pack_code_parameters(module: nn.Module, quant: LayerQuant, what: str) -> PackedWeight:
    """Pack the module's loaded code parameters and replace them by the packed ones (see the module
    docstring); codes beyond ``quant.bits`` raise ``ValueError`` naming ``what``."""
    codes = module.codes.data
    group_size = codes.shape[1] // quant.groups(int(codes.shape[1]))
    if codes.numel() and int(codes.max()) >= 1 << quant.bits:
        raise ValueError(f"{what}: codes up to {int(codes.max())} do not fit the declared {quant.bits} bits")
    exact = QuantCodes(codes, module.code_scales.data, module.code_zeros.data, module.code_mins.data,
                       bits=quant.bits, group_size=group_size)
    packed = pack(exact)
    for name in CODE_PARAMETERS:
        delattr(module, name)
    module.qweight = nn.Parameter(packed.qweight, requires_grad=False)
    module.qscales = nn.Parameter(packed.scales, requires_grad=False)
    module.qbiases = nn.Parameter(packed.biases, requires_grad=False)
    return packed


class PackedLinearMethod:
    """Weight-only quantized codes, packed after loading and multiplied by the bundle's ``quantized_linear``.

    Invariant: after ``process_weights_after_loading`` the layer's ``packed`` weight reads the layer's
    ``qweight`` / ``qscales`` / ``qbiases`` parameters (one copy in memory)."""

    def __init__(self, ops: KernelOps, quant: LayerQuant) -> None:
        self.ops = ops
        self.quant = quant

    def create_weights(self, layer: Linear, *, dtype: torch.dtype, device: torch.device) -> None:
        create_code_parameters(layer, layer.output_size, layer.input_size, self.quant, device)
        layer.packed = None

    def weight_loaded(self, layer: Linear, param: nn.Parameter, shard_id: object) -> None:
        """Pack as soon as the last code slice of the layer arrives (see the module docstring)."""
        tracker = getattr(layer, "code_tracker", None)
        if tracker is None:
            tracker = layer.code_tracker = CodeLoadTracker(layer, layer.shard_ids)
        if tracker.loaded(param, shard_id):
            self.process_weights_after_loading(layer)

    def process_weights_after_loading(self, layer: Linear) -> None:
        if layer.packed is None:
            layer.packed = pack_code_parameters(layer, self.quant, f"linear {layer.input_size}->{layer.output_size}")

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        perm = getattr(layer, "input_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        return self.ops.quantized_linear(x, layer.packed, bias)


def packed_weight(layer: Linear) -> PackedWeight | None:
    """The layer's ``PackedWeight`` when its method is exactly the packed one with no input permutation (what
    a fused kernel that multiplies packed weights may read), else ``None``."""
    if type(layer.method) is not PackedLinearMethod or getattr(layer, "input_perm", None) is not None:
        return None
    return getattr(layer, "packed", None)
