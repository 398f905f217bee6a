"""Checkpoint loading: Hugging Face safetensors directories, GGUF files and hub ids -> named tensors."""

from asyncllm.loaders.checkpoint import Checkpoint, TensorSource
from asyncllm.loaders.load import load_checkpoint, resolve_model_path

__all__ = ["Checkpoint", "TensorSource", "load_checkpoint", "resolve_model_path"]
