"""Deterministic UIDs and series numbers for derived objects.

A retry or a re-run of a pipeline on the same series must produce byte-for-byte the same identifiers, so the
PACS replaces (or ignores) what it already holds instead of growing a duplicate series. Every UID written by
:mod:`dicomnode.outputs.encode` is therefore a pure function of its inputs:

``derive_uid(*parts)`` = ``"2.25." + int(uuid5(DICOMNODE_NAMESPACE, "\\x1f".join(parts)))``

i.e. the ``2.25`` root (PS3.5 B.2: a UID made of a UUID's 128-bit integer value) over a name-based RFC 4122
version-5 UUID. The result is at most 44 characters, well within the 64 allowed. The namespace is fixed
below and must never change (changing it would re-identify every output ever produced).

Output identities use the parts (source SeriesInstanceUID, pipeline name, model name, model version, object
kind, "series" | instance index), see :class:`OutputIds`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dicomnode.config import OutputKind

#: Fixed namespace of all dicomnode UIDs (a random UUID chosen once; never change it).
DICOMNODE_NAMESPACE = uuid.UUID("6f1d3c0e-2b8a-4f47-9a55-0c6f4f2d7e11")
UID_ROOT = "2.25."
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a UID or in a sane pipeline/model name


def derive_uid(*parts: str) -> str:
    """A valid DICOM UID (``2.25.<decimal>``) that depends only on ``parts`` (order matters).

    Raises ValueError when no part is given (an empty name would make every caller collide).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    name = _SEPARATOR.join(parts)
    return UID_ROOT + str(uuid.uuid5(DICOMNODE_NAMESPACE, name).int)


#: Added to the pipeline's series number base: each kind of derived object is its own series. The offsets of
#: kinds that existed first never change (RTSTRUCT came later, so it is 5 although it is made after the SR).
SERIES_NUMBER_OFFSETS = {
    OutputKind.SEG: 0,
    OutputKind.SR: 1,
    OutputKind.SC_OVERLAY: 2,
    OutputKind.SC_PLANES: 3,
    OutputKind.SC_SURFACE: 4,
    OutputKind.RTSTRUCT: 5,
}


@dataclass(frozen=True)
class OutputIds:
    """Identity of every output derived from one source series by one pipeline and model version.

    ``series_number_base`` is the configured base; a kind's SeriesNumber is ``base`` plus its
    :data:`SERIES_NUMBER_OFFSETS`.
    """

    source_series_uid: str
    pipeline: str
    model_name: str
    model_version: str
    series_number_base: int

    def _parts(self, kind: OutputKind) -> tuple[str, ...]:
        return (self.source_series_uid, self.pipeline, self.model_name, self.model_version, kind.value)

    def series_uid(self, kind: OutputKind) -> str:
        """SeriesInstanceUID of the output series of ``kind``."""
        return derive_uid(*self._parts(kind), "series")

    def instance_uid(self, kind: OutputKind, index: int) -> str:
        """SOPInstanceUID of instance ``index`` (0-based) of the output series of ``kind``."""
        if index < 0:
            raise ValueError(f"instance index must be >= 0, got {index}")
        return derive_uid(*self._parts(kind), "instance", str(index))

    def series_number(self, kind: OutputKind) -> int:
        """SeriesNumber of the output series of ``kind`` (IS, so at most 2**31 - 1)."""
        number = self.series_number_base + SERIES_NUMBER_OFFSETS[kind]
        if not 0 < number < 2**31:
            raise ValueError(f"series number {number} out of range for kind {kind.value}")
        return number

    def uid(self, *parts: str) -> str:
        """Any further deterministic UID scoped to this output identity (tracking UIDs, device UIDs)."""
        return derive_uid(self.source_series_uid, self.pipeline, self.model_name, self.model_version, *parts)
