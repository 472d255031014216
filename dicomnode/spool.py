"""The spool: received instances on disk, exactly as received, durably.

Layout: ``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. A file appears under its final name only once its
bytes are on disk: write to a hidden temporary file in the same folder, ``fsync`` it, ``rename`` it over the
final name (atomic on POSIX, so a repeated SOP Instance UID replaces the earlier copy in one step), then ``fsync``
the folder so the rename itself survives a power cut. Temporary files left by a crash are removed at start-up;
they were never acknowledged.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import DicomNodeError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_PREFIX = ".tmp-"


class OutOfSpace(DicomNodeError):
    """Free space is under the configured floor, or the disk filled up while writing. Nothing was stored."""

    retryable = True


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return len(uid) <= 64 and bool(_UID_RE.match(uid))


@dataclass(frozen=True)
class SpooledFile:
    series_uid: str
    sop_uid: str
    path: Path
    size: int


class Spool:
    """Durable file store for received instances. Safe to use from many threads and processes."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance. Both UIDs must be valid DICOM UIDs (they become path components)."""
        if not (is_valid_uid(series_uid) and is_valid_uid(sop_uid)):
            raise ValueError(f"not a valid UID pair: {series_uid!r}, {sop_uid!r}")
        return self.root / series_uid / f"{sop_uid}.dcm"

    def has_room(self) -> bool:
        """True when free space on the spool's file system is above the configured floor."""
        return shutil.disk_usage(self.root).free >= self.min_free_bytes

    def write(self, series_uid: str, sop_uid: str, data: bytes) -> SpooledFile:
        """Store ``data`` durably under the instance's final path and return where it went.

        Raises :class:`OutOfSpace` (nothing left behind) when free space is under the floor or the disk fills.
        """
        if not self.has_room():
            raise OutOfSpace(f"free space on {self.root} is below {self.min_free_bytes // 2**20} MiB")
        final = self.path_for(series_uid, sop_uid)
        folder = final.parent
        new_folder = not folder.is_dir()
        if new_folder:
            folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{_TMP_PREFIX}{sop_uid}.{os.getpid()}.{id(data):x}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(f"disk full while writing to {folder}") from exc
            raise
        if self.fsync:
            _fsync_dir(folder)
            if new_folder:
                _fsync_dir(self.root)
        return SpooledFile(series_uid, sop_uid, final, len(data))

    def scan(self) -> Iterator[SpooledFile]:
        """Every complete instance file in the spool (temporary files are skipped)."""
        for series in sorted(self.root.iterdir()):
            if not series.is_dir() or not is_valid_uid(series.name):
                continue
            for entry in os.scandir(series):
                name = entry.name
                if name.startswith(_TMP_PREFIX) or not name.endswith(".dcm"):
                    continue
                yield SpooledFile(series.name, name[:-4], Path(entry.path), entry.stat().st_size)

    def remove_partial_files(self) -> int:
        """Delete temporary files a crash left behind (never acknowledged); return how many."""
        removed = 0
        for series in self.root.iterdir():
            if series.is_dir():
                for tmp in series.glob(f"{_TMP_PREFIX}*"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
        return removed

    def series_files(self, series_uid: str) -> list[Path]:
        folder = self.root / series_uid
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(_TMP_PREFIX))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
