"""asyncllm: an asyncio-native, embeddable LLM inference engine."""

from asyncllm.config import EngineConfig, ModelConfig

__all__ = ["EngineConfig", "ModelConfig"]
__version__ = "0.1.0"
