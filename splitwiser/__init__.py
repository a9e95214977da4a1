"""Splitwiser: a single-GPU LLM runtime that runs each request's prompt phase and token phase in
separate worker processes sharing one device, one copy of the weights and one KV block pool."""

import importlib

# Public names, imported on first use (PEP 562): ``import splitwiser.cli`` stays light until a
# command needs torch, so a Ctrl-C while the command line starts is handled by the CLI itself.
_EXPORTS = {
    "BatchedPipeline": "splitwiser.baselines",
    "ColocatedPipeline": "splitwiser.pipeline",
    "SequentialPipeline": "splitwiser.baselines",
    "EngineConfig": "splitwiser.config",
    "RequestHandle": "splitwiser.handle",
    "RequestMetrics": "splitwiser.outputs",
    "RequestOutput": "splitwiser.outputs",
    "TokenLogprobs": "splitwiser.outputs",
    "SplitwiserPipeline": "splitwiser.pipeline",
    "SamplingParams": "splitwiser.sampling",
    "VLLMParallelPipeline": "splitwiser.vllm",  # importing these does not import vllm
    "VLLMPipeline": "splitwiser.vllm",
    "VLLMSplitPipeline": "splitwiser.vllm",
    **dict.fromkeys(
        (
            "ConfigError",
            "InvalidRequestError",
            "KVCacheTooSmallError",
            "ModelNotFoundError",
            "PipelineClosedError",
            "SplitwiserError",
            "WorkerCrashedError",
            "WorkerStartupError",
        ),
        "splitwiser.errors",
    ),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitwiser' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "BatchedPipeline",
    "ColocatedPipeline",
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
    "TokenLogprobs",
    "VLLMParallelPipeline",
    "VLLMPipeline",
    "VLLMSplitPipeline",
    "WorkerCrashedError",
    "WorkerStartupError",
]
