"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class ReplicaError(Exception):
    """Base class: the message says what to change."""


class ConfigError(ReplicaError):
    """A configuration that cannot work: bad path, unknown model, impossible parameter."""


class MismatchError(ReplicaError):
    """Outputs or inputs made with different parameters (embedder, index, dims)."""
