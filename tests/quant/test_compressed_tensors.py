"""compressed-tensors unpacking against the ``compressed_tensors`` package's own compressors."""

from __future__ import annotations

import pytest
import torch

from asyncllm.quant.compressed_tensors import unpack_naive_quantized, unpack_pack_quantized

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from ._ct import compress, decompress, scheme
from ._packers import act_order_g_idx


def _weight(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1).to(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_quantized_matches_package(bits: int, symmetric: bool, group_size: int | None,
                                        dtype: torch.dtype) -> None:
    n, k = 40, 128  # N not a multiple of 32 / bits: the packed zero points are padded
    ct_scheme = scheme(bits, group_size, symmetric)
    state = compress(_weight(n, k, dtype, seed=bits), ct_scheme)
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape"} | (set() if symmetric else
                                                                               {"weight_zero_point"})
    out = unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"],
                                state.get("weight_zero_point"), bits=bits)
    assert out.input_perm is None
    codes = out.codes
    assert codes.group_size == (group_size or k) and codes.bits == bits
    signed = unpack_from_int32(state["weight_packed"], bits, torch.Size((n, k)))
    assert torch.equal(codes.codes.to(torch.int16), signed.to(torch.int16) + 2 ** (bits - 1))
    assert torch.equal(codes.scales, state["weight_scale"].float())
    assert torch.equal(codes.dequantize().to(dtype), decompress(state, ct_scheme))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, None])
def test_naive_quantized_matches_package(bits: int, symmetric: bool, group_size: int | None) -> None:
    ct_scheme = scheme(bits, group_size, symmetric)
    state = compress(_weight(32, 64, torch.bfloat16, seed=bits + 1), ct_scheme, "naive-quantized")
    assert state["weight"].dtype == torch.int8
    out = unpack_naive_quantized(state["weight"], state["weight_scale"], state.get("weight_zero_point"), bits=bits)
    assert torch.equal(out.codes.dequantize().to(torch.bfloat16), decompress(state, ct_scheme, "naive-quantized"))


def test_unpacked_int8_zero_points_are_read() -> None:
    """Older releases stored asymmetric zero points as signed int8 ``[N, K / G]``, unpacked."""
    ct_scheme = scheme(4, 32, symmetric=False)
    state = compress(_weight(32, 64, torch.bfloat16, seed=9), ct_scheme)
    packed = unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"],
                                   state["weight_zero_point"], bits=4)
    signed_zp = unpack_from_int32(state["weight_zero_point"], 4, torch.Size((32, 2)), packed_dim=0)
    legacy = unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"], signed_zp,
                                   bits=4)
    assert torch.equal(legacy.codes.zeros, packed.codes.zeros)
    assert torch.equal(legacy.codes.zeros, signed_zp.float() + 8)


def test_group_act_order() -> None:
    """``actorder: "group"`` checkpoints add ``weight_g_idx``; channel ``k`` uses scale ``g_idx[k]``."""
    n, k, g = 32, 128, 32
    ct_scheme = scheme(4, g, symmetric=False)
    state = compress(_weight(n, k, torch.bfloat16, seed=11), ct_scheme)
    g_idx = act_order_g_idx(k, g, torch.Generator().manual_seed(12)).to(torch.int32)
    out = unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"],
                                state["weight_zero_point"], g_idx, bits=4, act_order=True)
    signed = unpack_from_int32(state["weight_packed"], 4, torch.Size((n, k))).float()
    zp = unpack_from_int32(state["weight_zero_point"], 4, torch.Size((n, k // g)), packed_dim=0).float()
    groups = g_idx.long()
    reference = (signed - zp[:, groups]) * state["weight_scale"].float()[:, groups]
    assert out.input_perm is not None
    assert torch.equal(out.codes.dequantize(), reference[:, out.input_perm])
    with pytest.raises(ValueError, match="actorder"):
        unpack_pack_quantized(state["weight_packed"], state["weight_scale"], state["weight_shape"],
                              state["weight_zero_point"], g_idx, bits=4, act_order=False)


def test_inconsistent_shapes_raise() -> None:
    state = compress(_weight(32, 64, torch.bfloat16, seed=13), scheme(4, 32, symmetric=False))
    args = (state["weight_packed"], state["weight_scale"], state["weight_shape"])
    with pytest.raises(ValueError, match="weight_packed"):
        unpack_pack_quantized(state["weight_packed"][:, :4], *args[1:], state["weight_zero_point"], bits=4)
    with pytest.raises(ValueError, match="weight_zero_point"):
        unpack_pack_quantized(*args, state["weight_zero_point"][:, :1], bits=4)
    with pytest.raises(ValueError, match="weight_scale"):
        unpack_pack_quantized(args[0], args[1][:16], args[2], state["weight_zero_point"], bits=4)
    with pytest.raises(ValueError, match="weight_shape"):
        unpack_pack_quantized(args[0], args[1], torch.tensor([32.0, 64.0]), bits=4)
