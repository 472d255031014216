"""One exception root for dicomnode; every error says whether retrying can help.

The worker uses :attr:`DicomNodeError.retryable` to choose between a later attempt (with backoff) and a
final FAILED state. Errors raised by a pipeline stage end up, as ``str(error)``, in the job's reason.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Root of all dicomnode errors. ``retryable`` is False unless a subclass says otherwise.

    ``counts_attempt``: whether a retryable failure uses up one of ``worker.max_attempts``; False only when
    the job was not at fault (the inference engine could not be reached), so such a job waits and retries
    without ever failing for good.
    """

    retryable: bool = False
    counts_attempt: bool = True


class ConfigError(DicomNodeError):
    """The configuration file is missing, malformed, or names an unknown key or an invalid value."""


class StoreError(DicomNodeError):
    """The state store could not be read or written."""

    retryable = True


class VolumeError(DicomNodeError):
    """A series cannot form one volume (mixed orientations, duplicate positions, missing slices, ...).

    Final: the same files will fail the same way, so the job is FAILED with this message as the reason.
    """


class PipelineError(DicomNodeError):
    """A pipeline stage failed for a reason that will not change on retry."""


class TransientError(DicomNodeError):
    """A failure that may go away by itself: a peer is down, out of resources, a timeout."""

    retryable = True


class EngineUnavailable(TransientError):
    """The inference engine (a Ray cluster) cannot be reached, or had no free replica in time.

    Retryable, and the attempt does not count: the job waits (backoff at the base delay) until the engine is back.
    A replica that dies while running a job is a plain :class:`TransientError` (the job may be what kills it).
    """

    counts_attempt = False


class DeliveryError(DicomNodeError):
    """A C-STORE to a destination failed. ``retryable`` is set per failure by the SCU's classification."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
