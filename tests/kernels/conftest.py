"""Kernel test setup: run Triton kernels in the CPU interpreter unless a CUDA device is present.

The interpreter switch is read when a kernel is decorated, so it is set here, at import time, before any
test module imports the ``asyncllm.kernels.triton_*`` modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Used as both atol and rtol: fp32 kernels accumulate in fp32 and must agree with the reference far
# below 1e-3 relative error; fp16/bf16 allow a few output ulps.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

Matcher = Callable[[torch.Tensor, torch.Tensor], None]


@pytest.fixture(
    scope="session",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda,
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")],
        ),
    ],
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where kernels run: ``cpu`` through the Triton interpreter, ``cuda`` compiled."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off because a CUDA device is present")
    return torch.device(request.param)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def native_kernel() -> Any:
    """The native C decode attention (skipped without a C compiler; a failed build fails the test). Imported
    here, not at the top: this module sets the Triton interpreter switch before any kernel module loads."""
    from asyncllm.kernels.native_attention import NativeDecodeAttention

    from .native_support import require_native_kernels

    require_native_kernels()
    kernel = NativeDecodeAttention.load()
    assert kernel is not None
    return kernel


@pytest.fixture(scope="session")
def assert_matches() -> Matcher:
    """Compare a kernel's output with the reference's under the tolerance of the reference's dtype."""
    return _assert_matches
