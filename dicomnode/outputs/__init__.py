"""Stage 3, outputs: derived DICOM objects and their delivery.

:mod:`.encode` builds the objects a pipeline sends (SEG :mod:`.seg`, SR :mod:`.sr`, RT Structure Set
:mod:`.rtstruct`, Secondary Captures :mod:`.sc` with :mod:`.render` and :mod:`.surface`), with deterministic UIDs
(:mod:`.uids`), provenance (:mod:`.provenance`) and a read-back check (:mod:`.validate`). Delivery has one
interface, :class:`.delivery.Sender` (each answer stored, retryable or permanent), with one implementation per
destination kind, chosen by :func:`.destinations.open_sender`: C-STORE (:mod:`.scu`), STOW-RS (:mod:`.dicomweb`)
and a folder (:mod:`.folder`). May import: :mod:`dicomnode.imaging`, :mod:`dicomnode.state` (outbox records,
the spool's durable write), :mod:`dicomnode.telemetry`, ``config``, ``errors``.
"""
