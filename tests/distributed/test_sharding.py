"""Tensor-parallel sharding without processes: the partition rules, and that each rank's slice of a dense or
quantized linear, loaded from the full checkpoint tensors, recombines (column: concatenated, row: summed) to
the unsharded layer's output. Collectives are not needed here: the test plays every rank itself."""

from __future__ import annotations

import pytest
import torch

from asyncllm.config import EngineConfig
from asyncllm.distributed.parallel_state import TensorParallel, head_partition, vocab_range
from asyncllm.kernels import TORCH_OPS
from asyncllm.layers.linear import Linear, QKVLinear, UnquantizedLinearMethod
from asyncllm.quant.layer_quant import LayerQuant
from asyncllm.quant.packed import QuantCodes
from asyncllm.quant.packed_linear import PackedLinearMethod

CPU = torch.device("cpu")


def ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank, size) for rank in range(size)]


def test_head_partition_splits_or_replicates_kv_heads() -> None:
    # 8 query heads, 2 KV heads over 4 ranks: two query heads each, KV head 0 on ranks 0-1, 1 on ranks 2-3
    parts = [head_partition(8, 2, p) for p in ranks(4)]
    assert [(p.q_start, p.num_heads, p.kv_start, p.num_kv_heads) for p in parts] == [
        (0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]
    # every local query head's KV head (in the full model, head // group) is the rank's KV head
    for p in parts:
        assert {h // 4 for h in range(p.q_start, p.q_start + p.num_heads)} == {p.kv_start}
    assert [(p.kv_start, p.num_kv_heads) for p in (head_partition(8, 4, q) for q in ranks(2))] == [(0, 2), (2, 2)]


@pytest.mark.parametrize(("heads", "kv_heads", "size"), [(6, 2, 4), (4, 3, 2), (8, 3, 2)])
def test_head_partition_refuses_shapes_that_do_not_split(heads: int, kv_heads: int, size: int) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        head_partition(heads, kv_heads, TensorParallel(0, size))


def test_vocab_range_pads_every_rank_to_the_same_rows() -> None:
    assert [vocab_range(10, p) for p in ranks(3)] == [(0, 4, 4), (4, 4, 4), (8, 2, 4)]
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vocab_range(2, TensorParallel(0, 3))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_engine_config_validates_tensor_parallel_size(bad: object) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=bad)  # type: ignore[arg-type]


def test_engine_config_refuses_one_gpu_for_several_ranks() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=2, device="cuda:1")


def _codes(n: int, k: int, group: int, seed: int) -> QuantCodes:
    g = torch.Generator().manual_seed(seed)
    return QuantCodes(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g),
                      torch.rand(n, k // group, generator=g) * 0.1 + 0.01,
                      torch.randint(0, 16, (n, k // group), generator=g).float(),
                      torch.randn(n, k // group, generator=g) * 0.01, bits=4, group_size=group)


def _load_codes(layer: Linear, codes: QuantCodes, shard: object = None) -> None:
    for name, tensor in (("codes", codes.codes), ("code_scales", codes.scales), ("code_zeros", codes.zeros),
                         ("code_mins", codes.mins)):
        layer.weight_loader(getattr(layer, name), tensor, shard)  # type: ignore[arg-type]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("size", [2, 4])
def test_row_split_linear_sums_to_the_full_product(quantized: bool, size: int) -> None:
    n, k = 24, 128
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    codes = _codes(n, k, 32, seed=2)
    dense = codes.dequantize()
    total = torch.zeros(3, n)
    for parallel in ranks(size):
        method = PackedLinearMethod(TORCH_OPS, LayerQuant(4, 32)) if quantized else UnquantizedLinearMethod(TORCH_OPS)
        layer = Linear(k, n, bias=True, method=method, dtype=torch.float32, device=CPU, parallel=parallel,
                       split="row")
        assert layer.input_size == k // size
        _load_codes(layer, codes) if quantized else layer.weight_loader(layer.weight, dense)
        layer.weight_loader(layer.bias, bias)  # type: ignore[arg-type]
        layer.process_weights_after_loading()
        start = parallel.rank * (k // size)
        total += layer.method.apply(layer, x[:, start:start + k // size], None)
    torch.testing.assert_close(total + bias, x @ dense.T + bias, atol=1e-4, rtol=1e-4)


def test_column_split_qkv_concatenates_to_each_rank_heads_with_bias() -> None:
    hidden, head_dim, heads, kv_heads, size = 32, 8, 4, 1, 2   # one KV head, replicated on both ranks
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(h * head_dim, hidden, generator=g) for h in (heads, kv_heads, kv_heads))
    bq, bk, bv = (torch.randn(h * head_dim, generator=g) for h in (heads, kv_heads, kv_heads))
    x = torch.randn(5, hidden, generator=g)
    outputs = []
    for parallel in ranks(size):
        layer = QKVLinear(hidden, head_dim, heads, kv_heads, bias=True, method=UnquantizedLinearMethod(TORCH_OPS),
                          dtype=torch.float32, device=CPU, parallel=parallel)
        for shard, weight, bias in (("q", q, bq), ("k", k, bk), ("v", v, bv)):
            layer.weight_loader(layer.weight, weight, shard)
            layer.weight_loader(layer.bias, bias, shard)  # type: ignore[arg-type]
        layer.process_weights_after_loading()
        outputs.append([t.flatten(1) for t in layer.split(layer(x))])
    half = heads * head_dim // size
    for rank, (lq, lk, lv) in enumerate(outputs):
        torch.testing.assert_close(lq, (x @ q.T + bq)[:, rank * half:(rank + 1) * half])
        torch.testing.assert_close(lk, x @ k.T + bk)   # the replicated KV head
        torch.testing.assert_close(lv, x @ v.T + bv)


def test_quantized_row_split_refuses_groups_that_do_not_divide() -> None:
    # 128 inputs over 8 ranks leave 16 per rank: not a whole group of 32
    with pytest.raises(ValueError, match="tensor_parallel_size: 8"):
        Linear(128, 16, bias=False, method=PackedLinearMethod(TORCH_OPS, LayerQuant(4, 32)), dtype=torch.float32,
               device=CPU, parallel=TensorParallel(0, 8), split="row")


def test_row_split_refuses_an_input_permutation() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size.*act-order"):
        Linear(128, 16, bias=False, method=PackedLinearMethod(TORCH_OPS, LayerQuant(4, 32, permuted=True)),
               dtype=torch.float32, device=CPU, parallel=TensorParallel(0, 2), split="row")


def test_split_cpus_gives_each_rank_its_own_contiguous_cpus() -> None:
    from asyncllm.cpu_threads import split_cpus

    assert split_cpus([3, 0, 1, 2, 5], 2) == [(0, 1, 2), (3, 5)]
    assert split_cpus(range(8), 4) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert split_cpus([0], 2) is None
    with pytest.raises(ValueError, match="parts"):
        split_cpus([0, 1], 0)


@pytest.mark.parametrize(("device", "expected"), [("cuda", "cuda:1"), ("cpu", "cpu")])
def test_a_rank_builds_on_its_own_device_with_the_unsupported_paths_off(device: str, expected: str) -> None:
    from asyncllm.distributed.worker import rank_config

    config = rank_config(EngineConfig(device=device, tensor_parallel_size=2, load_progress=True), 1)
    assert (config.device, config.tensor_parallel_size) == (expected, 1)
    assert config.enforce_eager and config.native_layer_max_rows == 0 and not config.adaptive_threads
    assert not config.load_progress  # only rank 0 draws the bar
