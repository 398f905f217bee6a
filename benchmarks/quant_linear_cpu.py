"""Weight-only quantized linears on CPU against the fp32 dense path, alternating candidates in one run.

    PYTHONPATH=src python benchmarks/quant_linear_cpu.py                      # all shapes, M = 1..128
    PYTHONPATH=src python benchmarks/quant_linear_cpu.py --shapes smol --rows 1 2 4 --pool-mib 1024

Candidates (each skipped where it does not apply):
  dense     ``kernels.cpu.linear_cpu`` on the dequantized weight in the CPU bundle's layout (``k_major_layout``):
            the fp32 baseline every ratio is against
  gemv      ``NativeQuantLinear.gemv``: the C kernel, int8 activations per block of 32, VNNI dots
  tiled     ``NativeQuantLinear.dequantized``: weight slabs dequantized in C, then torch's GEMM
  int4pack  torch's ``_weight_int4pack_mm_for_cpu`` on a repacked copy (4-bit, group sizes 32..256)
  dequant   ``F.linear(x, weight.dequantize(), None)``: the torch fallback, dequantizing every call

Every round runs each candidate in turn (the order rotates) for ``--min-ms`` of calls, timing each call;
the table shows, per candidate, ``--stat best`` (default): the median over rounds of each round's fastest
call, or ``--stat median``: the median of all calls; and the ratio to ``dense`` (below 1 is faster). On a
shared machine a call whose thread loses its core waits a scheduler timeslice (milliseconds) at the
OpenMP barrier, so medians of all calls track the machine's load; ``best`` tracks the kernels.
``--pool-mib N`` gives every candidate copies of its weights totalling at least N MiB, cycled call by call,
so weights stream from memory as in a model larger than the caches; the default 0 reuses one copy
(cache-resident: compute and call overhead). On a loaded machine ``OMP_WAIT_POLICY=PASSIVE`` (threads
sleep at barriers instead of spinning) keeps busy neighbours from stalling every call for a timeslice.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyncllm.kernels.cpu import k_major_layout, linear_cpu
from asyncllm.kernels.native_quant import native_quant_linear
from asyncllm.quant.packed import PackedWeight, QuantCodes, pack


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    k: int
    bits: int
    group_size: int


SHAPES = {
    "smol": [
        Shape("smol q/o", 576, 576, 4, 32),
        Shape("smol k/v", 192, 576, 4, 32),
        Shape("smol gate+up", 3072, 576, 4, 32),
        Shape("smol down", 576, 1536, 4, 32),
        Shape("smol lm_head q8", 49152, 576, 8, 32),
    ],
    "8b": [
        Shape("8b gate/up", 14336, 4096, 4, 32),
        Shape("8b down", 4096, 14336, 4, 32),
    ],
}


def random_weight(shape: Shape, seed: int) -> PackedWeight:
    """Codes uniform over the storage width with a mid-range zero point (as Q4_0 / Q8_0)."""
    gen = torch.Generator().manual_seed(seed)
    groups = shape.k // shape.group_size
    top = 2 ** shape.bits
    codes = torch.randint(0, top, (shape.n, shape.k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(shape.n, groups, generator=gen) * 0.01 + 0.001
    zeros = torch.full((shape.n, groups), top / 2)
    return pack(QuantCodes(codes, scales, zeros, torch.zeros(shape.n, groups), bits=shape.bits,
                           group_size=shape.group_size))


def _int4pack(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(packed, scales_and_zeros)`` for torch's int4 kernel, whose weight is ``(q - 8) * scale + zero``."""
    if weight.bits != 4 or weight.group_size not in (32, 64, 128, 256):
        return None
    op = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return None
    packed = op(weight.codes().to(torch.int32), 1)
    zeros = weight.biases + 8 * weight.scales
    return packed, torch.stack((weight.scales, zeros), dim=-1).transpose(0, 1).contiguous()


Call = Callable[[torch.Tensor], torch.Tensor]


def candidates(shape: Shape, copies: dict[str, int]) -> dict[str, list[Call]]:
    """Each candidate's calls, one per weight copy."""
    base = random_weight(shape, seed=0)
    out: dict[str, list[Call]] = {}

    def clone(w: PackedWeight) -> PackedWeight:
        return PackedWeight(w.qweight.clone(), w.scales.clone(), w.biases.clone(), w.bits, w.group_size,
                            w.in_features)

    quant = [base] + [clone(base) for _ in range(copies["quant"] - 1)]
    dense_w = k_major_layout(base.dequantize())
    dense = [dense_w] + [dense_w.clone() for _ in range(copies["dense"] - 1)]  # clone keeps the layout
    out["dense"] = [lambda x, w=w: linear_cpu(x, w, None) for w in dense]
    kernel = native_quant_linear()
    if kernel is not None:
        out["gemv"] = [lambda x, w=w: kernel.gemv(x, w, None) for w in quant]
        out["tiled"] = [lambda x, w=w: kernel.dequantized(x, w, None) for w in quant]
    packed = _int4pack(base)
    if packed is not None:
        tables = [packed] + [(packed[0].clone(), packed[1].clone()) for _ in range(copies["quant"] - 1)]
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
        out["int4pack"] = [lambda x, t=t: op(x, t[0], shape.group_size, t[1]) for t in tables]
    out["dequant"] = [lambda x, w=w: F.linear(x, w.dequantize(), None) for w in quant[:1]]
    return out


def measure(calls: dict[str, list[Call]], x: torch.Tensor, rounds: int, min_ms: float, stat: str) -> dict[str, float]:
    """µs per call of each candidate (``stat``: see the module docstring), alternating candidates."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    best: dict[str, list[float]] = {name: [] for name in calls}
    position = dict.fromkeys(calls, 0)
    names = list(calls)
    for name in names:  # warm up (builds, first-touch, oneDNN primitive caches)
        calls[name][0](x)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            pool = calls[name]
            spent, count = 0.0, 0
            while spent * 1e3 < min_ms or count < 3:
                call = pool[position[name] % len(pool)]
                position[name] += 1
                start = time.perf_counter()
                call(x)
                elapsed = time.perf_counter() - start
                times[name].append(elapsed * 1e6)
                spent += elapsed
                count += 1
            best[name].append(min(times[name][-count:]))
    chosen = best if stat == "best" else times
    return {name: statistics.median(values) for name, values in chosen.items()}


def check(calls: dict[str, list[Call]], x: torch.Tensor) -> dict[str, float]:
    """Each candidate's largest deviation from ``dense``, relative to the largest dense output."""
    reference = calls["dense"][0](x)
    scale = float(reference.abs().max()) or 1.0
    return {name: float((pool[0](x) - reference).abs().max()) / scale for name, pool in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-ms", type=float, default=20.0, help="time per candidate per round")
    parser.add_argument("--pool-mib", type=float, default=0.0, help="weight copies per candidate (0: one copy)")
    parser.add_argument("--stat", choices=("best", "median"), default="best")
    parser.add_argument("--skip", nargs="*", default=[], help="candidates to leave out")
    parser.add_argument("--group-size", type=int, default=None, help="override every shape's group size")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds}, stat {args.stat}, "
          f"pool {args.pool_mib} MiB per candidate")
    header = None
    for family in args.shapes:
        for shape in SHAPES[family]:
            if args.group_size is not None:
                shape = Shape(shape.name, shape.n, shape.k, shape.bits, args.group_size)
            dense_bytes = shape.n * shape.k * 4
            quant_bytes = random_weight(Shape("", 1, shape.k, shape.bits, shape.group_size), 0).nbytes * shape.n
            copies = {"dense": max(1, int(-(-args.pool_mib * 2**20 // dense_bytes))),
                      "quant": max(1, int(-(-args.pool_mib * 2**20 // quant_bytes)))}
            calls = {name: pool for name, pool in candidates(shape, copies).items() if name not in args.skip}
            if header is None:
                header = list(calls)
                print(f"{'shape':28s} {'M':>4s} " + " ".join(f"{name + ' us':>12s}" for name in header)
                      + "   " + " ".join(f"{name + '/dense':>14s}" for name in header if name != "dense"))
            for rows in args.rows:
                x = torch.randn(rows, shape.k)
                errors = check(calls, x)
                medians = measure(calls, x, args.rounds, args.min_ms, args.stat)
                label = f"{shape.name} {shape.n}x{shape.k} b{shape.bits} g{shape.group_size}"
                cells = [f"{medians[name]:12.1f}" if name in medians else f"{'-':>12s}" for name in header]
                ratios = [f"{medians[name] / medians['dense']:14.2f}" if name in medians else f"{'-':>14s}"
                          for name in header if name != "dense"]
                worst = max((v for name, v in errors.items() if name != "dense"), default=0.0)
                print(f"{label:28s} {rows:4d} " + " ".join(cells) + "   " + " ".join(ratios)
                      + f"   max rel dev {worst:.1e}", flush=True)
            del calls


if __name__ == "__main__":
    main()
