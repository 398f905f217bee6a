"""A fast, memory-mapped reader for the GGUF container (versions 2 and 3, little-endian).

It parses the header (metadata key/values and tensor descriptors) with ``struct`` in one pass over a
read-only ``numpy.memmap``: tensor bytes are read from disk only when a tensor is touched, and nothing
ever writes to the file. The ``gguf`` package's ``GGUFReader`` builds a
numpy view per string of the tokenizer arrays, which costs seconds on a 50k-token vocabulary; this
reader decodes those strings directly and is what keeps cold start short.

Invariants: ``GGUFTensorInfo.shape`` is in GGUF order (``shape[0]`` is the innermost, contiguous
dimension; a Hugging Face ``[out, in]`` weight is stored as ``(in, out)``); every tensor's byte range
lies inside the file; ``raw_bytes`` returns a read-only ``uint8`` view of exactly ``nbytes`` bytes and
``read_bytes`` a new tensor holding a copy of them.
"""

from __future__ import annotations

import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor descriptor: name, GGUF-order shape, storage type id and absolute byte range."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def ggml_type(self) -> GGMLQuantizationType | None:
        """The storage type, or ``None`` for a type id this version of ``gguf`` does not know."""
        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            return None

    @property
    def type_name(self) -> str:
        ggml_type = self.ggml_type
        return ggml_type.name if ggml_type is not None else f"unknown type id {self.type_id}"

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Row-major (PyTorch / Hugging Face) shape: the GGUF shape reversed."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class _Cursor:
    """Sequential little-endian decoding over a byte buffer; raises ``ValueError`` past its end."""

    def __init__(self, buffer: memoryview, path: pathlib.Path) -> None:
        self._buffer = buffer
        self._path = path
        self.pos = 0

    def _need(self, size: int) -> None:
        if self.pos + size > len(self._buffer):
            raise ValueError(f"{self._path}: GGUF header is truncated at byte {self.pos}")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (value,) = struct.unpack_from(fmt, self._buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self._need(length)
        raw = bytes(self._buffer[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, value_type: int) -> Any:
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise ValueError(f"{self._path}: unknown GGUF value type {value_type} at byte {self.pos}")
        return self.scalar(fmt)

    def array(self) -> list[Any]:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type == GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        if item_type == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        dtype = _NUMPY_DTYPES.get(item_type)
        if dtype is None:
            raise ValueError(f"{self._path}: unknown GGUF array item type {item_type} at byte {self.pos}")
        size = np.dtype(dtype).itemsize * count
        self._need(size)
        values = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        if item_type == GGUFValueType.BOOL:
            return [bool(v) for v in values]
        return values.tolist()


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> Python value), ``tensors`` (name -> info, file order)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with self.path.open("rb") as handle:
            if handle.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{self.path} is not a GGUF file (bad magic bytes)")
        self._data: np.ndarray = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._data), self.path)
        cursor.pos = 4
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise ValueError(
                f"{self.path}: unsupported GGUF version {version} (supported: 2 and 3, little-endian)"
            )
        tensor_count = cursor.scalar("<Q")
        kv_count = cursor.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        self.metadata = metadata
        self.version = version
        descriptors = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.scalar("<I")
            shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
            type_id = cursor.scalar("<I")
            relative_offset = cursor.scalar("<Q")
            descriptors.append((name, shape, type_id, relative_offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment must be a power of two, got {alignment}")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, type_id, relative_offset in descriptors:
            info = GGUFTensorInfo(name, shape, type_id, data_start + relative_offset,
                                  _tensor_nbytes(name, shape, type_id))
            if info.offset + info.nbytes > len(self._data):
                raise ValueError(f"{self.path}: tensor {name!r} extends past the end of the file")
            if name in self.tensors:
                raise ValueError(f"{self.path}: duplicate tensor name {name!r}")
            self.tensors[name] = info

    def raw_bytes(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's stored bytes as a read-only ``uint8`` view of the mapping (no copy)."""
        return self._data[info.offset:info.offset + info.nbytes]

    def read_bytes(self, info: GGUFTensorInfo) -> torch.Tensor:
        """A new 1-D ``uint8`` tensor holding a copy of the tensor's stored bytes."""
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        out.numpy()[:] = self.raw_bytes(info)
        return out


def _tensor_nbytes(name: str, shape: tuple[int, ...], type_id: int) -> int:
    """Bytes a tensor occupies; 0 for a type unknown to ``gguf`` (those are rejected when read)."""
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0
    if shape and shape[0] % block_size:
        raise ValueError(
            f"tensor {name!r}: row length {shape[0]} is not a multiple of the "
            f"{GGMLQuantizationType(type_id).name} block size {block_size}"
        )
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return n_elements // block_size * type_size
