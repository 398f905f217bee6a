"""asyncllm: an asyncio-native, embeddable LLM inference engine.

>>> async with AsyncEngine.from_pretrained(path) as engine:
...     async for text in engine.stream("Once upon a time", max_tokens=64):
...         print(text, end="")
"""

import asyncllm._openmp_env  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
from asyncllm.config import EngineConfig, ModelConfig
from asyncllm.engine import AsyncEngine, EngineClosedError, EngineStats, StepFailedError
from asyncllm.outputs import Completion, StepOutput, Usage
from asyncllm.pipeline import Pipeline, pipeline
from asyncllm.sampling import SamplingParams, TokenLogprobs
from asyncllm.session import Session, SessionBusyError, SessionClosedError
from asyncllm.streams import RequestStream, TextStream

__all__ = [
    "AsyncEngine",
    "Completion",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "ModelConfig",
    "Pipeline",
    "RequestStream",
    "SamplingParams",
    "Session",
    "SessionBusyError",
    "SessionClosedError",
    "StepFailedError",
    "StepOutput",
    "TextStream",
    "TokenLogprobs",
    "Usage",
    "pipeline",
]
__version__ = "0.1.0"
