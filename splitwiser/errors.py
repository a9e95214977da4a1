"""Every error the package raises derives from :class:`SplitwiserError`."""

from __future__ import annotations


class SplitwiserError(Exception):
    """Base class of all errors raised by splitwiser."""


class ConfigError(SplitwiserError, ValueError):
    """A pipeline option is invalid (zero workers, unknown dtype, a pool that holds nothing...)."""


class ModelNotFoundError(SplitwiserError, FileNotFoundError):
    """The model is not a local directory, a ``random:`` preset, or a hub id in the cache."""


class InvalidRequestError(SplitwiserError, ValueError):
    """A request cannot be served as given (empty prompt, prompt longer than the context...)."""


class KVCacheTooSmallError(InvalidRequestError):
    """A request needs more KV blocks than the whole pool holds, so it could never be admitted."""


class WorkerCrashedError(SplitwiserError, RuntimeError):
    """A worker process died while it owned the request."""


class WorkerStartupError(SplitwiserError, RuntimeError):
    """A worker process failed to start or did not report ready in time."""


class PipelineClosedError(SplitwiserError, RuntimeError):
    """The pipeline was closed; it accepts no more requests."""
