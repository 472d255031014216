"""Stage 3, outputs: derived DICOM objects and their delivery.

:mod:`.encode` builds the objects a pipeline sends (SEG :mod:`.seg`, SR :mod:`.sr`, Secondary Captures
:mod:`.sc` with :mod:`.render` and :mod:`.surface`), with deterministic UIDs (:mod:`.uids`), provenance
(:mod:`.provenance`) and a read-back check (:mod:`.validate`); :mod:`.scu` delivers files with C-STORE and
classifies each status as stored, retryable or permanent. May import: :mod:`dicomnode.imaging`,
:mod:`dicomnode.state` (outbox records), :mod:`dicomnode.telemetry`, ``config``, ``errors``.
"""
