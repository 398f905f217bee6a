"""AWQ over a decoder, one layer at a time, on asyncllm's own modules (pre-norm, fused QKV / gate-up).

For each layer, with ``x`` the layer's input (the previous layer's full-precision output):

1. one full-precision pass records the inputs of the attention block, ``o_proj``, the MLP and
   ``down_proj`` (forward pre-hooks), and the layer's output, which becomes the next layer's input;
2. scales are searched (``awq_search.search_scales``) for each smoothing group, each on the original
   weights: input norm -> ``qkv_proj`` (block: the attention), ``v`` rows -> ``o_proj`` (only when the
   query and key-value head counts are equal, so each ``v`` channel feeds exactly one ``o_proj`` input),
   post-attention norm -> ``gate_up_proj`` (block: the MLP), ``up`` rows -> ``down_proj``;
3. every scale is applied: the linears' input columns are multiplied by it and the producer divided (norm
   weight, or output rows and bias), which leaves the layer's function unchanged; the recorded inputs are
   divided too;
4. clip limits are searched and applied per linear (``v`` rows of ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
   ``down_proj``; the query and key rows are never clipped, their errors are amplified by the softmax).

The weights stay dense float32; quantizing them to codes is the caller's last step. Memory: the model
plus one layer's recorded activations (four ``[T, *]`` tensors) and its input and output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from asyncllm.kernels import KVCache
from asyncllm.layers.linear import Linear, QKVLinear, dense_weight
from asyncllm.layers.norm import RMSNorm
from asyncllm.offline_batch import OfflineBatch
from asyncllm.quant.awq_search import QuantScheme, ScaleSearch, apply_clip, search_clip, search_scales

DEFAULT_SEARCH_TOKENS = 2048
"""Calibration tokens (whole sequences) each scale candidate is scored on."""


@dataclass(frozen=True)
class LayerReport:
    """What AWQ did to one layer: each smoothing group's block error with plain RTN and with its scales."""

    index: int
    searches: dict[str, ScaleSearch]


@dataclass
class _Recorded:
    attn_in: torch.Tensor
    o_in: torch.Tensor
    mlp_in: torch.Tensor
    down_in: torch.Tensor


def _weight(linear: Linear) -> torch.Tensor:
    weight = dense_weight(linear)
    if weight is None:
        raise ValueError(f"{linear!r}: AWQ needs dense weights (load the model with dequantize_weights=True)")
    return weight.data


def _parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, RMSNorm, RMSNorm]:
    """(attention, MLP, input norm, post-attention norm), or a ``ValueError`` for another layer shape."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)
    names = ("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")
    if (attn is None or mlp is None or not all(isinstance(n, RMSNorm) for n in norms)
            or not isinstance(getattr(attn, "qkv_proj", None), QKVLinear)
            or not all(isinstance(getattr(m, n, None), Linear) for m, pair in zip((attn, mlp), names, strict=True)
                       for n in pair)):
        raise ValueError(f"model: AWQ supports pre-norm decoder layers with fused qkv/gate-up projections, "
                         f"not {type(layer).__name__}")
    return attn, mlp, norms[0], norms[1]


class LayerCalibration:
    """Runs AWQ on the layers of one model over one calibration batch (see the module docstring).

    The activation statistics and the clip search read every calibration token; the scale searches score
    their candidates on at most ``search_tokens`` of them: whole sequences, evenly spaced over the batch
    (attention needs whole sequences), each candidate costing one pass of its block over them."""

    def __init__(self, scheme: QuantScheme, group_size_for: Callable[[int], int], batch: OfflineBatch,
                 kv_cache: KVCache, *, search_tokens: int = DEFAULT_SEARCH_TOKENS) -> None:
        self.scheme = scheme
        self.group_size_for = group_size_for
        self.batch = batch
        self.kv_cache = kv_cache
        self.search_batch, self.search_rows = _search_subset(batch, search_tokens, kv_cache.key.device)

    def run(self, layer: nn.Module, index: int, hidden: torch.Tensor) -> tuple[torch.Tensor, LayerReport]:
        """AWQ-scale and clip ``layer`` in place; returns its full-precision output for ``hidden`` (the next
        layer's input) and the report."""
        attn, mlp, input_norm, post_norm = _parts(layer)
        recorded, output = self._record(layer, attn, mlp, hidden)
        rows, sub = self.search_rows, self.search_batch
        attn_in, o_in, mlp_in, down_in = (t.index_select(0, rows) for t in (
            recorded.attn_in, recorded.o_in, recorded.mlp_in, recorded.down_in))

        def attention() -> torch.Tensor:
            return attn(sub.positions, attn_in.clone(), sub.meta, self.kv_cache)

        qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        inter = gate_up.output_sizes[1]
        searches: dict[str, ScaleSearch] = {}
        searches["qkv"] = self._search(recorded.attn_in, [qkv], attention, attention())
        v_to_o = qkv.num_heads == qkv.num_kv_heads
        if v_to_o:
            searches["v_o"] = self._search(recorded.o_in, [o], lambda: o(o_in), o(o_in))
        searches["gate_up"] = self._search(recorded.mlp_in, [gate_up], lambda: mlp(mlp_in.clone()),
                                           mlp(mlp_in.clone()))
        searches["down"] = self._search(recorded.down_in, [down], lambda: down(down_in), down(down_in))

        _fold_into_norm(input_norm, qkv, searches["qkv"].scales)
        recorded.attn_in.div_(searches["qkv"].scales)
        v_rows = slice(qkv.output_sizes[0] + qkv.output_sizes[1], qkv.output_size)
        if v_to_o:
            _fold_into_rows(qkv, v_rows, o, searches["v_o"].scales)
            recorded.o_in.div_(searches["v_o"].scales)
        _fold_into_norm(post_norm, gate_up, searches["gate_up"].scales)
        recorded.mlp_in.div_(searches["gate_up"].scales)
        _fold_into_rows(gate_up, slice(inter, 2 * inter), down, searches["down"].scales)
        recorded.down_in.div_(searches["down"].scales)

        self._clip(_weight(qkv)[v_rows], recorded.attn_in)
        self._clip(_weight(o), recorded.o_in)
        self._clip(_weight(gate_up), recorded.mlp_in)
        self._clip(_weight(down), recorded.down_in)
        return output, LayerReport(index, searches)

    def _record(self, layer: nn.Module, attn: nn.Module, mlp: nn.Module,
                hidden: torch.Tensor) -> tuple[_Recorded, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str, position: int) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                seen[name] = args[position].detach().clone()
            return hook

        handles = [attn.register_forward_pre_hook(keep("attn_in", 1)),
                   attn.o_proj.register_forward_pre_hook(keep("o_in", 0)),
                   mlp.register_forward_pre_hook(keep("mlp_in", 0)),
                   mlp.down_proj.register_forward_pre_hook(keep("down_in", 0))]
        try:
            block_out, residual = layer(self.batch.positions, hidden.clone(), None, self.batch.meta, self.kv_cache)
            output = block_out + residual
        finally:
            for handle in handles:
                handle.remove()
        return _Recorded(seen["attn_in"], seen["o_in"], seen["mlp_in"], seen["down_in"]), output

    def _search(self, x: torch.Tensor, linears: list[Linear], block: Callable[[], torch.Tensor],
                reference: torch.Tensor) -> ScaleSearch:
        groups = [self.group_size_for(linear.input_size) for linear in linears]
        return search_scales(x, [_weight(linear) for linear in linears], groups, self.scheme, block, reference)

    def _clip(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        group = self.group_size_for(int(weight.shape[1]))
        apply_clip(weight, search_clip(weight, x, group, self.scheme))


def _search_subset(batch: OfflineBatch, search_tokens: int,
                   device: torch.device) -> tuple[OfflineBatch, torch.Tensor]:
    """Whole sequences of ``batch``, evenly spaced, holding at most ``search_tokens`` tokens (at least one
    sequence): their batch and their rows in ``batch``."""
    count = len(batch.lengths)
    taken = count
    while taken > 1 and sum(batch.lengths[round(i * count / taken)] for i in range(taken)) > search_tokens:
        taken -= 1
    picks = sorted({round(i * count / taken) for i in range(taken)})
    starts = batch.starts
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in picks]).to(device)
    sub = OfflineBatch.of([batch.lengths[i] for i in picks], block_size=batch.block_size, device=device)
    return sub, rows


def _fold_into_norm(norm: RMSNorm, linear: Linear, scales: torch.Tensor) -> None:
    """``linear``'s input columns times ``scales``, ``norm``'s weight divided by them."""
    norm.weight.data.div_(scales.to(norm.weight.dtype))
    _weight(linear).mul_(scales.to(_weight(linear).dtype))


def _fold_into_rows(producer: Linear, rows: slice, consumer: Linear, scales: torch.Tensor) -> None:
    """``consumer``'s input columns times ``scales``, ``producer``'s output ``rows`` (and bias) divided."""
    _weight(producer)[rows].div_(scales.to(_weight(producer).dtype).unsqueeze(1))
    if producer.bias is not None:
        producer.bias.data[rows].div_(scales.to(producer.bias.dtype))
    _weight(consumer).mul_(scales.to(_weight(consumer).dtype))
