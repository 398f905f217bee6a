"""Search helpers of the sampler: the top-p cutoff over a row's candidates or, when those do not reach
``top_p``, over float32 bit-pattern buckets of the whole row, and two-level inverse-CDF draws.

Every function works on whole batches of rows on the logits' device, without a full-vocabulary sort.
"""

from __future__ import annotations

import torch

_FLOAT32_ONE_BITS = 0x3F800000  # bit pattern of 1.0; float32 values in [0, 1] have patterns up to it
_BUCKET_ROWS = 64  # rows bucketed at a time by the top-p fallback
_CDF_BLOCK = 256  # block width of the two-level inverse-CDF sampling


def pick(t: torch.Tensor, rows: list[int], total: int) -> torch.Tensor:
    """``t[rows]`` (a copy), or ``t`` itself when ``rows`` is every row in order."""
    if len(rows) == total:
        return t
    return t[torch.tensor(rows, dtype=torch.long, device=t.device)]


def _search(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of ``weights`` ``[m, c]`` (>= 0), the first index whose float64 CDF exceeds ``target`` ``[m, 1]``.

    A zero weight never starts a CDF step, so the index has positive weight; if rounding put ``target`` at
    the row's total, the last positive index is returned instead.
    """
    cdf = torch.cumsum(weights, dim=1, dtype=torch.float64)
    found = torch.searchsorted(cdf, target * cdf[:, -1:], right=True).squeeze(1)
    positions = torch.arange(weights.shape[1], device=weights.device)
    return torch.minimum(found, torch.where(weights > 0, positions, -1).amax(dim=1))


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of the unnormalised ``probs`` ``[m, c]`` with one uniform ``[m, 1]`` per row.

    The index always has positive probability. Wide rows are sampled in two levels, a block of
    ``_CDF_BLOCK`` from the block sums, then a token inside it with the uniform rescaled to that block, so no
    ``[m, c]`` float64 CDF is built; both CDFs are accumulated in float64.
    """
    m, width = probs.shape
    if width <= 2 * _CDF_BLOCK:
        return _search(probs, uniform)
    full = width // _CDF_BLOCK * _CDF_BLOCK
    block_sums = probs[:, :full].view(m, -1, _CDF_BLOCK).sum(dim=2)
    if full < width:
        block_sums = torch.cat([block_sums, probs[:, full:].sum(dim=1, keepdim=True)], dim=1)
    block = _search(block_sums, uniform).unsqueeze(1)
    block_cdf = torch.cumsum(block_sums, dim=1, dtype=torch.float64)
    total = block_cdf[:, -1:]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    # Where the uniform fell inside the chosen block, as a fraction of the block's mass.
    fraction = ((uniform * total - before) / (block_cdf.gather(1, block) - before)).nan_to_num_(0.0)
    positions = block * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=probs.device)
    in_block = probs.gather(1, positions.clamp(max=width - 1)).masked_fill_(positions >= width, 0.0)
    return block.squeeze(1) * _CDF_BLOCK + _search(in_block, fraction.clamp_(0.0, 1.0))


def candidate_cutoff(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor,
                      floor: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cutoff logit of each row's kept set, from its ``c`` largest logits ``values`` ``[m, c]`` (descending).

    ``top_k`` ``[m]`` (0: off, else ``<= c``), ``top_p`` ``[m]`` (1: off), ``total`` ``[m]``: the row's full
    unnormalised mass (used by top-p rows without top-k), ``floor`` ``[m]``: the min-p cutoff (``-inf``: off).
    Returns ``(cutoff, covered)``: a token is kept iff its logit is ``>= cutoff``; ``covered`` marks the rows
    whose kept set lies inside the candidates, the only rows for which ``cutoff`` is exact.
    """
    c = values.shape[1]
    neg_inf = torch.tensor(float("-inf"), device=values.device)
    k_on = top_k > 0
    k_cut = torch.where(k_on, values.gather(1, (top_k - 1).clamp_(0, c - 1).unsqueeze(1)).squeeze(1), neg_inf)
    mass = values.exp().masked_fill_(values < k_cut.unsqueeze(1), 0.0)
    cumulative = mass.cumsum(dim=1)
    # With top-k on, the distribution that top-p renormalises is the top-k set, which the candidates hold.
    target = top_p * torch.where(k_on, cumulative[:, -1], total)
    p_on = top_p < 1.0
    keep = ((cumulative - mass) < target.unsqueeze(1)).sum(dim=1).clamp_(min=1)
    p_cut = torch.where(p_on, values.gather(1, (keep - 1).unsqueeze(1)).squeeze(1), neg_inf)
    cutoff = torch.maximum(torch.maximum(k_cut, p_cut), floor)
    covered = k_on | (p_on & (cumulative[:, -1] >= target)) | (values[:, -1] < floor)
    if c >= vocab:
        covered.fill_(True)
    return cutoff, covered


def _bucket_shift(vocab: int) -> int:
    """Low bits to drop from a float32 in ``[0, 1]`` for top-p buckets: the finest bucketing (at most 7
    mantissa bits, a relative width of 2**-7) whose table is no larger than half the vocabulary."""
    for shift in range(16, 23):
        if (_FLOAT32_ONE_BITS >> shift) + 1 <= vocab // 2:
            return shift
    return 23


def top_p_cutoff_by_buckets(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smallest probability top-p keeps in each row of ``probs`` ``[r, V]`` (unnormalised, all in ``[0, 1]``).

    ``target`` ``[r]``: the mass the kept set must reach. Kept are the tokens with ``p >= cutoff``. No row is
    sorted: a float32 ``>= 0`` orders like its bit pattern, so tokens are bucketed by their high bits (see
    ``_bucket_shift``), the bucket holding the cutoff is found from the bucket masses, and only that bucket's
    tokens are ranked. Rows go ``_BUCKET_ROWS`` at a time to bound the bucket tables' memory.
    """
    if probs.shape[0] > _BUCKET_ROWS:
        return torch.cat([top_p_cutoff_by_buckets(probs[i:i + _BUCKET_ROWS], target[i:i + _BUCKET_ROWS])
                          for i in range(0, probs.shape[0], _BUCKET_ROWS)])
    shift = _bucket_shift(probs.shape[1])
    buckets = (_FLOAT32_ONE_BITS >> shift) + 1
    rows = probs.shape[0]
    offsets = torch.arange(0, rows * buckets, buckets, dtype=torch.int32, device=probs.device).unsqueeze(1)
    keys = (probs.view(torch.int32) >> shift).add_(offsets)  # row-major bucket ids, int32 to save memory
    bucket_mass = torch.zeros(rows, buckets, dtype=probs.dtype, device=probs.device)
    bucket_mass.view(-1).index_add_(0, keys.view(-1), probs.view(-1))
    from_top = bucket_mass.flip(1).cumsum(dim=1, dtype=torch.float64)  # mass of buckets >= last - j
    goal = target.to(torch.float64).unsqueeze(1)
    j = torch.searchsorted(from_top, goal).clamp_(max=buckets - 1)  # first j reaching the goal
    above = torch.where(j > 0, from_top.gather(1, (j - 1).clamp(min=0)), 0.0)  # mass of higher buckets
    in_bucket = keys == (buckets - 1 - j).to(torch.int32) + offsets
    count = in_bucket.sum(dim=1, keepdim=True)
    ranked = (probs * in_bucket).topk(int(count.max()), dim=1).values  # the bucket's tokens, descending
    mass = ranked.to(torch.float64)
    cumulative = above + mass.cumsum(dim=1)
    keep = ((cumulative - mass) < goal).sum(dim=1, keepdim=True)
    keep = torch.minimum(keep, count).clamp_(min=1)
    return ranked.gather(1, keep - 1).squeeze(1)
