"""Model building blocks: linear (with a weight-loading hook), norm, rotary, activation, attention, embedding.

Each block calls only ``KernelOps`` members for the ops the kernels provide, so the torch reference and
Triton kernels are interchangeable.
"""

from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.attention import PagedAttention
from asyncllm.layers.embedding import LMHead, VocabEmbedding
from asyncllm.layers.linear import Linear, MergedColumnLinear, QKVLinear
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding, build_cos_sin_cache
from asyncllm.layers.weights import ShardId, WeightLoading

__all__ = [
    "LMHead",
    "Linear",
    "MergedColumnLinear",
    "PagedAttention",
    "QKVLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "ShardId",
    "SiluAndMul",
    "VocabEmbedding",
    "WeightLoading",
    "build_cos_sin_cache",
]
