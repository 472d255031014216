"""One exception root for dicomnode; every error says whether retrying can help.

The worker uses :attr:`DicomNodeError.retryable` to choose between a later attempt (with backoff) and a
final FAILED state. Errors raised by a pipeline stage end up, as ``str(error)``, in the job's reason.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Root of all dicomnode errors. ``retryable`` is False unless a subclass says otherwise."""

    retryable: bool = False


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


class DeliveryError(DicomNodeError):
    """A C-STORE to a destination failed. ``retryable`` is set per failure by the SCU's classification."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
