"""The spool's incoming files: written in parts as an instance arrives, durable only at commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomnode.state import spool as spool_module
from dicomnode.state.spool import Spool

KIB = 1024


def _receive(spool: Spool, data: bytes, fragment: int = 16 * KIB) -> Path:
    incoming = spool.incoming()
    view = memoryview(data)
    for start in range(0, len(data), fragment):
        incoming.write(view[start:start + fragment])
    return incoming.commit("1.2.826.0.1.3680043.9.7", "1.2.826.0.1.3680043.9.7.1").path


@pytest.mark.parametrize("fsync", [True, False])
def test_disk_writes_of_a_large_instance_start_while_it_arrives_only_when_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool) -> None:
    real = spool_module._start_writeback
    assert real is not None, "sync_file_range should exist on Linux"
    started: list[tuple[int, int, int]] = []

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        result = real(fd, offset, length, flags)
        started.append((offset, length, result))
        return result

    monkeypatch.setattr(spool_module, "_start_writeback", recording)
    data = os.urandom(600 * KIB)  # a 512x512 slice and more: two full parts and a tail
    path = _receive(Spool(tmp_path / "spool", fsync=fsync), data)

    assert path.read_bytes() == data
    if fsync:
        # Each full 256 KiB part is handed to the disk as soon as it is written (the kernel accepted it: 0);
        # the tail is left to the commit's fsync.
        assert started == [(0, 256 * KIB, 0), (256 * KIB, 256 * KIB, 0)]
    else:
        assert started == []  # without fsync the kernel may batch writes as it likes


def test_small_instance_is_written_once_at_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        started.append(length)
        return 0

    monkeypatch.setattr(spool_module, "_start_writeback", record)
    data = os.urandom(100 * KIB)
    spool = Spool(tmp_path / "spool")
    incoming = spool.incoming()
    incoming.write(data)
    with incoming.contents() as view:  # still in memory: nothing has gone to the file yet
        assert bytes(view) == data
    assert os.path.getsize(incoming.path) == 0
    path = incoming.commit("1.2.826.0.1.3680043.9.7", "1.2.826.0.1.3680043.9.7.2").path
    assert path.read_bytes() == data and started == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file is gone
