"""vLLM as systems of their own, with the ``generate`` / ``submit`` contract of
``SplitwiserPipeline``: plain vLLM (``VLLMPipeline``), Splitwiser's parallel vLLM engines
(``VLLMParallelPipeline``) and the phase split on vLLM with NIXL (``VLLMSplitPipeline``).

Importing this package does not import vLLM; building a pipeline without vLLM installed raises
a ``ConfigError`` that names the install command.
"""

from splitwiser.vllm.pipeline import (
    INSTALL_HINT,
    VLLMParallelPipeline,
    VLLMPipeline,
    require_vllm,
)
from splitwiser.vllm.split import VLLMSplitPipeline

__all__ = [
    "INSTALL_HINT",
    "VLLMParallelPipeline",
    "VLLMPipeline",
    "VLLMSplitPipeline",
    "require_vllm",
]
