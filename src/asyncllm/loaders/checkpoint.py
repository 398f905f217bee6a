"""The format-independent view of a checkpoint that model code consumes."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from asyncllm.quant.config import UNQUANTIZED, QuantizationConfig

CheckpointFormat = Literal["hf", "gguf"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TensorSource(Protocol):
    """Streams a checkpoint's tensors under Hugging Face parameter names."""

    def tensor_names(self) -> tuple[str, ...]: ...

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]: ...


def check_float_dtype(dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``dtype`` is a floating-point dtype tensors can be decoded to."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype}")


@dataclass(frozen=True)
class Checkpoint:
    """A model checkpoint resolved to a Hugging Face shape.

    ``hf_config`` is a ``config.json``-style dict (``architectures``, ``hidden_size``, ...,
    ``tie_word_embeddings``); ``local_path`` is the model directory or the ``.gguf`` file (the tokenizer
    is loaded from it); ``format`` says which; ``gguf_metadata`` is a GGUF file's parsed metadata
    (``None`` for other formats), from which its tokenizer is built without parsing the file again;
    ``quantization`` says which modules arrive as weight-only quantized codes (``UNQUANTIZED``: none).
    ``tensors(dtype)`` streams ``(name, tensor)`` pairs one at a time under Hugging Face parameter names
    (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``, ..., ``lm_head.weight``
    unless embeddings are tied) with weights shaped ``[out_features, in_features]``.

    Invariants: every yielded tensor is a new contiguous CPU tensor that the caller owns (it aliases
    neither the file nor any other yielded tensor); floating-point tensors are converted to ``dtype``
    except a quantized module's float32 code parameters (``*.code_scales`` / ``code_zeros`` /
    ``code_mins``), integer tensors (codes, packed formats) are yielded unchanged; names are unique and
    equal ``tensor_names()``, in the same order.
    """

    hf_config: dict[str, Any]
    local_path: pathlib.Path
    format: CheckpointFormat
    source: TensorSource = field(repr=False, compare=False)
    gguf_metadata: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    quantization: QuantizationConfig = field(default=UNQUANTIZED, compare=False)

    def tensor_names(self) -> tuple[str, ...]:
        return self.source.tensor_names()

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        check_float_dtype(dtype)
        return self.source.tensors(dtype)
