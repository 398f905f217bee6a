"""LLaVA-NeXT's "anyres" tiling arithmetic, shared by preprocessing (how many prompt tokens an image takes)
and the model (how an image's tile features are packed into those rows).

An image of original size ``(height, width)`` is fitted into the best of the checkpoint's
``image_grid_pinpoints`` resolutions (the one keeping the most of the image's pixels, then wasting the
fewest), which is cut into ``rows x cols`` square tiles of the vision tower's ``image_size``; a downscaled
copy of the whole image comes first (the base tile). Each tile gives ``side x side`` feature rows
(``side = image_size // patch_size``). The tiles' features form a ``rows*side x cols*side`` grid, from
which the padding added to keep the aspect ratio is cut off again (``unpadded_shape``); every row of what
remains is followed by one ``image_newline`` row. So an image takes
``side**2 + height' * (width' + 1)`` prompt tokens, ``(height', width')`` being the unpadded grid.

Pure integer arithmetic mirroring Hugging Face's ``select_best_resolution``, ``get_anyres_image_grid_shape``
and ``unpad_image`` (their rounding included), so token counts agree with its processor.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_best_resolution(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(height, width)`` of ``pinpoints`` that keeps the most of an image of ``size`` ``(height,
    width)`` when it is scaled to fit, ties broken by the least wasted area (first wins among equals)."""
    if not pinpoints:
        raise ValueError("image_grid_pinpoints: must not be empty")
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"image_sizes: must be positive, got {size}")
    best = pinpoints[0]
    best_effective, best_wasted = 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    return best


def grid_shape(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int) -> tuple[int, int]:
    """``(rows, cols)`` of ``tile``-pixel tiles an image of ``size`` is cut into."""
    height, width = select_best_resolution(size, pinpoints)
    return height // tile, width // tile


def unpadded_shape(size: tuple[int, int], grid_height: int, grid_width: int) -> tuple[int, int]:
    """The ``(height, width)`` left of a ``grid_height x grid_width`` feature grid once the padding that
    fitted an image of ``size`` into it (centred, aspect ratio kept) is removed."""
    height, width = size
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        padding = (grid_height - new_height) // 2
        return grid_height - 2 * padding, grid_width
    new_width = int(round(width * (grid_height / height), 7))
    padding = (grid_width - new_width) // 2
    return grid_height, grid_width - 2 * padding


def num_tiles(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int) -> int:
    """Tiles an image of ``size`` is encoded as: the base tile plus ``rows * cols``."""
    rows, cols = grid_shape(size, pinpoints, tile)
    return 1 + rows * cols


def num_image_tokens(size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int, side: int) -> int:
    """Prompt tokens an image of ``size`` takes (see the module docstring)."""
    rows, cols = grid_shape(size, pinpoints, tile)
    height, width = unpadded_shape(size, rows * side, cols * side)
    return side * side + height * (width + 1)
