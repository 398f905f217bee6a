"""Mixture-of-experts: top-k routing and the expert computation over stacked expert weights.

``select_experts`` turns router logits into each token's experts; ``moe_*`` computes

    out[t] = sum_k  topk_weights[t, k] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = topk_ids[t, k]

over stacked weights: ``w_gate_up`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows) and ``w_down``
``[E, H, I]``. Invariants every implementation assumes: ``x`` ``[T, H]``; ``topk_ids`` ``[T, K]`` integer with
every id in ``[0, E)`` and no id repeated within a row (routing picks distinct experts); ``topk_weights``
``[T, K]`` floating (any dtype; the products are taken in ``x``'s dtype as Hugging Face does); the result is
``[T, H]`` in ``x.dtype``. The reference loops over experts and is the spec; the CPU path groups tokens by
expert; the Triton path (``triton_moe``) sorts them into per-expert blocks for two grouped GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (in float32), then the ``top_k`` largest, renormalized to sum to one when
    ``renormalize`` (Mixtral always; Qwen2-MoE when ``norm_topk_prob``). Returns ``(weights [T, K] float32,
    ids [T, K] int64)``, each row's experts in descending weight, ties broken as ``torch.topk`` does."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def check_moe_shapes(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first argument whose shape breaks the invariants above."""
    if x.dim() != 2:
        raise ValueError(f"x: expected [T, H], got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up: expected [E, 2I, {hidden}], got shape {tuple(w_gate_up.shape)}")
    experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (experts, hidden, inter):
        raise ValueError(f"w_down: expected {(experts, hidden, inter)}, got shape {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids/topk_weights: expected [{tokens}, K] each, got shapes "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")


def _expert(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def moe_reference(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """The spec: for each expert, the tokens routed to it, through its gated MLP, scaled and summed."""
    check_moe_shapes(x, topk_weights, topk_ids, w_gate_up, w_down)
    out = torch.zeros_like(x)
    for expert in range(w_gate_up.shape[0]):
        tokens, slot = torch.where(topk_ids == expert)
        if tokens.numel() == 0:
            continue
        y = _expert(x[tokens], w_gate_up[expert], w_down[expert])
        out.index_add_(0, tokens, y * topk_weights[tokens, slot, None].to(x.dtype))
    return out


def moe_cpu(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Tokens grouped by expert: the ``T * K`` (token, expert) pairs sorted by expert, one gather of their
    rows, one GEMM pair per active expert over its contiguous run, one scaled ``index_add_`` back."""
    check_moe_shapes(x, topk_weights, topk_ids, w_gate_up, w_down)
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    tokens = order // top_k
    rows = x.index_select(0, tokens)
    out_rows = torch.empty_like(rows)
    begin = 0
    for expert, count in enumerate(counts):
        if count:
            end = begin + count
            out_rows[begin:end] = _expert(rows[begin:end], w_gate_up[expert], w_down[expert])
            begin = end
    out_rows.mul_(topk_weights.reshape(-1)[order, None].to(x.dtype))
    return torch.zeros_like(x).index_add_(0, tokens, out_rows)
