"""Model weights in one arena backed by transparent huge pages (CPU, Linux).

A CPU decode step streams every weight once, hundreds of megabytes through many small matmuls; with 4 KiB
pages that is a TLB miss every 4 KiB. ``place_in_arena`` moves a module's parameters into one 2 MiB
aligned buffer, in registration order (the order a forward pass reads them), and asks the kernel to back
it with huge pages (``madvise(MADV_HUGEPAGE)``, honoured when transparent huge pages are ``always`` or
``madvise``). Elsewhere, or when the advice is refused, the weights still end up in one contiguous buffer.

Invariants: every parameter keeps its ``Parameter`` object, shape, dtype and values (``copy=True``); only
its storage changes, so tied parameters stay tied (each is placed once) and references to the ``Parameter``
stay valid. References to the old ``param.data`` tensors do not follow the move.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14
_ALIGN_BYTES = 64  # each parameter starts on a cache line


@dataclass(frozen=True)
class Arena:
    """Where the parameters went: ``nbytes`` of arena (padding included) holding ``num_parameters``."""

    nbytes: int
    num_parameters: int
    huge_pages_advised: bool


def _aligned(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _advise_huge_pages(address: int, length: int) -> bool:
    if not sys.platform.startswith("linux") or length < HUGE_PAGE_BYTES:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    result = libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), ctypes.c_int(_MADV_HUGEPAGE))
    if result != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    return result == 0


def place_in_arena(module: nn.Module, *, copy: bool = True, huge_pages: bool = True) -> Arena | None:
    """Rebind every parameter of ``module`` (all on CPU) to a view of one freshly allocated arena.

    ``copy=False`` skips copying values, for parameters not loaded yet. Returns ``None`` (and changes
    nothing) when the module has no parameters or any of them is not on the CPU.
    """
    params = list(module.parameters())
    if not params or any(param.device.type != "cpu" for param in params):
        return None
    offsets = []
    end = 0
    for param in params:
        start = _aligned(end, max(_ALIGN_BYTES, param.element_size()))
        offsets.append(start)
        end = start + param.numel() * param.element_size()
    raw = torch.empty(end + HUGE_PAGE_BYTES, dtype=torch.uint8)
    base = _aligned(raw.data_ptr(), HUGE_PAGE_BYTES) - raw.data_ptr()
    advised = huge_pages and _advise_huge_pages(raw.data_ptr() + base, end // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES)
    with torch.no_grad():
        for param, offset in zip(params, offsets, strict=True):
            nbytes = param.numel() * param.element_size()
            view = raw[base + offset : base + offset + nbytes].view(param.dtype).view(param.shape)
            if copy:
                view.copy_(param.data)
            param.data = view
    return Arena(nbytes=end, num_parameters=len(params), huge_pages_advised=advised)
