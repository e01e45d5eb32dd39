"""Errors a user can act on, and the exit code each one ends a command with.

| code | meaning |
| --- | --- |
| 0 | ok (data failures, if any, within the limits) |
| 1 | the run failed or is incomplete: rerunning the same command resumes it |
| 2 | refused before any work: usage, config or validation error |
| 3 | finished, but data failures exceeded the ``--max-failed-*`` limits |
| 4 | the output is locked by another run |

The CLI prints a :class:`ReplicaError`'s message on one line and exits with its ``exit_code``.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_TOO_MANY_FAILURES = 3
EXIT_LOCKED = 4


class ReplicaError(Exception):
    """Base class: the message says what to change."""

    exit_code = EXIT_FAILED


class ConfigError(ReplicaError):
    """A configuration that cannot work: bad path, unknown model, impossible parameter."""

    exit_code = EXIT_REFUSED


class MismatchError(ReplicaError):
    """Outputs or inputs made with different parameters (embedder, index, dims)."""

    exit_code = EXIT_REFUSED


class RunIncomplete(ReplicaError):
    """The run stopped before all its work was done; a rerun resumes it."""

    exit_code = EXIT_FAILED


class TooManyFailures(ReplicaError):
    """The run finished, but its data failures exceeded the ``--max-failed-*`` limits."""

    exit_code = EXIT_TOO_MANY_FAILURES


class OutputLocked(ReplicaError):
    """Another run holds the output's lock."""

    exit_code = EXIT_LOCKED
