"""The ``folder`` destination: durable files, one folder per series, named by UIDs only.

Layout: ``<path>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (the spool's layout and its durable write: a
temporary file, fsync, rename over the final name, fsync of the folder; a new series folder is fsync-ed into
``<path>`` too; a crash can leave only a ``.tmp-*.part`` file, never a partial file under a final name). Paths
hold no patient identifier. The bytes written are the bytes of the outbox (or spool) file,
unchanged.

Idempotent: a file already there with the same bytes is left as it is (a retry after a crash, or a re-run
with deterministic UIDs, writes nothing new); a file with other bytes under the same SOP Instance UID is
replaced in one step, as a PACS replaces an instance sent again.

Outcomes: written (or already there) is STORED; a full disk is RETRYABLE; a file that cannot be read, has no
valid SeriesInstanceUID, or a folder that cannot be written (permissions) is PERMANENT, with the reason.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.config import Destination
from dicomnode.errors import DeliveryError
from dicomnode.outputs.delivery import OnResult, Outcome, Proceed, StoreResult, always
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.spool import OutOfSpace, Spool, fsync_dir, is_valid_uid
from dicomnode.telemetry import metrics

log = logging.getLogger(__name__)


class FolderSender:
    """The :class:`~dicomnode.outputs.delivery.Sender` of a ``folder`` destination (module docstring)."""

    def __init__(self, dest: Destination, *, fsync: bool = True) -> None:
        if dest.path is None:
            raise DeliveryError(f"{dest.name}: a folder destination needs a path", retryable=False)
        self.dest = dest
        self.root: Path = dest.path
        self.fsync = fsync
        self._spool: Spool | None = None

    def _open(self) -> Spool:
        if self._spool is None:
            try:
                new = not self.root.is_dir()
                self._spool = Spool(self.root, fsync=self.fsync)
                if new and self.fsync:
                    fsync_dir(self.root.parent)
            except OSError as exc:
                raise DeliveryError(f"{self.dest.name}: cannot use folder {self.root}: {exc.strerror}",
                                    retryable=exc.errno in (errno.ENOSPC, errno.EDQUOT)) from exc
        return self._spool

    def send(self, files: Sequence[OutboundFile], *, on_result: OnResult | None = None,
             proceed: Proceed = always) -> list[StoreResult]:
        spool = self._open()
        results: list[StoreResult] = []
        with metrics.stage_timer("send"):
            for f in files:
                if not proceed():
                    break
                result = self._write(spool, f)
                results.append(result)
                metrics.send_outcome(result.outcome.value)
                if on_result is not None:
                    on_result(result)
        return results

    def _write(self, spool: Spool, f: OutboundFile) -> StoreResult:
        try:
            data = Path(f.path).read_bytes()
        except OSError as exc:
            return StoreResult(f, Outcome.PERMANENT, None, f"cannot read {f.path}: {exc.strerror}")
        series_uid = _series_uid(data)
        if series_uid is None or not is_valid_uid(f.sop_uid):
            return StoreResult(f, Outcome.PERMANENT, None, "no valid SeriesInstanceUID / SOPInstanceUID to name it")
        target = spool.path_for(series_uid, f.sop_uid)
        try:
            if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
                return StoreResult(f, Outcome.STORED, None, f"already in {target.parent.name}/ (same bytes)")
            self._write_durably(spool, series_uid, f.sop_uid, data)
        except OutOfSpace as exc:
            return StoreResult(f, Outcome.RETRYABLE, None, f"{self.dest.name}: {exc}")
        except OSError as exc:
            retryable = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            return StoreResult(f, Outcome.RETRYABLE if retryable else Outcome.PERMANENT, None,
                               f"{self.dest.name}: cannot write {target.name}: {exc.strerror}")
        return StoreResult(f, Outcome.STORED, None, f"written to {target.parent.name}/")

    def _write_durably(self, spool: Spool, series_uid: str, sop_uid: str, data: bytes) -> None:
        """Temporary file in the series folder, fsync, rename, fsync the folder (and the root for a new folder)."""
        folder = spool.root / series_uid
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            if self.fsync:
                fsync_dir(spool.root)
        incoming = spool.incoming(near=series_uid)  # made in the series folder: no stray .incoming folder
        try:
            incoming.write(data)
            incoming.commit(series_uid, sop_uid)
        except BaseException:
            incoming.discard()
            raise

    def close(self) -> None:
        """Nothing to release."""



def _series_uid(data: bytes) -> str | None:
    """SeriesInstanceUID of a Part 10 file's bytes, if it has a valid one (it becomes a folder name)."""
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except (InvalidDicomError, ValueError, EOFError, KeyError):
        return None
    uid = str(ds.get("SeriesInstanceUID", ""))
    return uid if is_valid_uid(uid) else None
