"""Splitwiser: a single-GPU LLM runtime that runs each request's prompt phase and token phase in
separate worker processes sharing one device, one copy of the weights and one KV block pool."""

from splitwiser.baselines import BatchedPipeline, SequentialPipeline
from splitwiser.config import EngineConfig
from splitwiser.engine.handle import RequestHandle
from splitwiser.errors import (
    ConfigError,
    InvalidRequestError,
    KVCacheTooSmallError,
    ModelNotFoundError,
    PipelineClosedError,
    SplitwiserError,
    WorkerCrashedError,
    WorkerStartupError,
)
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.pipeline import SplitwiserPipeline
from splitwiser.sampling import SamplingParams
from splitwiser.vllm import VLLMParallelPipeline, VLLMPipeline, VLLMSplitPipeline  # no vllm import

__version__ = "0.1.0"

__all__ = [
    "BatchedPipeline",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "KVCacheTooSmallError",
    "ModelNotFoundError",
    "PipelineClosedError",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SequentialPipeline",
    "SplitwiserError",
    "SplitwiserPipeline",
    "VLLMParallelPipeline",
    "VLLMPipeline",
    "VLLMSplitPipeline",
    "WorkerCrashedError",
    "WorkerStartupError",
]
