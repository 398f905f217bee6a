"""What tests of the native CPU kernels need from the machine."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from asyncllm.kernels.native_attention import NativeDecodeAttention


def require_native_kernels() -> None:
    """Skip without a C compiler (the kernels build with the machine's GCC); where one exists, the kernel
    must build: a compile failure fails the test instead of hiding behind a skip."""
    if not sys.platform.startswith("linux") or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("needs Linux and a C compiler (GCC) to build the native CPU kernels")
    assert NativeDecodeAttention.load() is not None, "the native decode attention kernel failed to build"
