"""One :class:`~dicomnode.outputs.delivery.Sender` per destination kind: the only place that knows them all."""

from __future__ import annotations

from dicomnode.config import Destination, DestinationKind
from dicomnode.outputs.delivery import Sender
from dicomnode.outputs.folder import FolderSender
from dicomnode.outputs.scu import ScuSender, ScuSettings


def open_sender(dest: Destination, scu: ScuSettings, *, fsync: bool = True) -> Sender:
    """The sender of ``dest``: C-STORE with ``scu``'s AE title and TLS (``dicom``), STOW-RS (``dicomweb``) or
    durable files (``folder``; ``fsync`` as ``storage.fsync``). Close it when done.

    Raises DeliveryError (not retryable) when it cannot be set up (a credentials variable not set, a bad URL).
    """
    if dest.kind is DestinationKind.DICOMWEB:
        from dicomnode.outputs.dicomweb import StowSender  # noqa: PLC0415 - requests only where it is used

        return StowSender(dest)
    if dest.kind is DestinationKind.FOLDER:
        return FolderSender(dest, fsync=fsync)
    return ScuSender(dest, scu)
