"""The dispatch point hands out the Triton kernels for backend ``"triton"``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from asyncllm.kernels import TORCH_OPS, KernelOps, get_kernel_ops
from asyncllm.kernels.triton_activation import silu_and_mul_triton
from asyncllm.kernels.triton_attention import paged_attention_triton
from asyncllm.kernels.triton_kv_write import write_kv_triton
from asyncllm.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from asyncllm.kernels.triton_rotary import rotary_triton


def test_triton_backend_returns_triton_kernels() -> None:
    ops = get_kernel_ops("triton", torch.device("cpu"))
    assert isinstance(ops, KernelOps)
    assert ops.name == "triton"
    expected = {
        "rms_norm": rms_norm_triton,
        "add_rms_norm": add_rms_norm_triton,
        "rotary": rotary_triton,
        "silu_and_mul": silu_and_mul_triton,
        "write_kv": write_kv_triton,
        "paged_attention": paged_attention_triton,
    }
    # matmuls stay with the framework (cuBLAS on CUDA): every other member is a Triton kernel
    members = {f.name for f in dataclasses.fields(KernelOps)} - {"name", "linear"}
    assert members == set(expected)
    for member, kernel in expected.items():
        assert getattr(ops, member) is kernel
        assert getattr(ops, member) is not getattr(TORCH_OPS, member)
    assert ops.linear is torch.nn.functional.linear


def test_torch_backend_gives_the_reference_ops_on_cpu() -> None:
    assert get_kernel_ops("torch", torch.device("cpu")) is TORCH_OPS
