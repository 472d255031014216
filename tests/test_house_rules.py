"""House rules the code keeps: closed sets as enums, no per-call flips of library globals, explicit errors
instead of asserts, SCU associations built one way (all timeouts)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from pydicom.config import IGNORE, RAISE, WARN
from pydicom.dataelem import DataElement
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from torch import nn

import dicomnode
from dicomnode.config import (
    Destination,
    OutputKind,
    SegmenterKind,
    output_kinds,
    parse_config,
)
from dicomnode.errors import ConfigError, DeliveryError, PipelineError
from dicomnode.inference import ModelRunner, RunnerSettings
from dicomnode.inference.segmenter import ClassicalSegmenter, build_segmenter
from dicomnode.outputs import validate
from dicomnode.outputs.scu import ScuSettings, echo, send_files
from dicomnode.outputs.uids import SERIES_NUMBER_OFFSETS
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.spool import Spool
from tests.conftest import series_dir
from tests.peers import free_port

# ------------------------------------------------------------------------------------------- closed sets


def test_config_parses_kinds_into_the_enums() -> None:
    cfg = parse_config({"destinations": [{"name": "d", "ae_title": "D", "host": "127.0.0.1", "port": 104}],
                        "pipelines": [{"name": "p", "kind": "segment", "destinations": ["d"],
                                       "model": {"kind": "brain"}, "outputs": {"kinds": ["sc", "seg", "seg"]}}]})
    pipe = cfg.pipeline("p")
    assert pipe.model.kind is SegmenterKind.BRAIN
    # the "sc" alias expands to the three picture kinds; duplicates collapse; output order, not config order
    assert pipe.outputs.kinds == (OutputKind.SEG, OutputKind.SC_OVERLAY, OutputKind.SC_PLANES,
                                  OutputKind.SC_SURFACE)


@pytest.mark.parametrize(("section", "message"), [
    ({"model": {"kind": "nope"}}, "model.kind: 'nope' is not one of 'lung', 'body', 'brain', 'lung-unet'"),
    ({"outputs": {"kinds": ["seg", "movie"]}}, "outputs.kinds: 'movie' is not one of seg, sr, rtstruct, sc-overlay"),
])
def test_unknown_kinds_are_config_errors_listing_the_enum(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"pipelines": [{"name": "p", "kind": "segment", **section}]})
    assert message in str(info.value)


def test_every_kind_is_known_to_the_factory_and_the_encoder() -> None:
    for kind in SegmenterKind:
        if kind.needs_path:
            with pytest.raises(PipelineError, match="needs a model path"):
                build_segmenter(kind)
        elif kind is SegmenterKind.TOTALSEGMENTATOR:  # its weights folder (default: ~/.totalsegmentator) is empty
            with pytest.raises(PipelineError, match="TotalSegmentator"):
                build_segmenter(kind)
        else:
            assert build_segmenter(kind) is not None
    assert isinstance(build_segmenter("lung"), ClassicalSegmenter)  # values work as well as members
    with pytest.raises(PipelineError, match="unknown segmenter kind 'x'"):
        build_segmenter("x")
    assert set(SERIES_NUMBER_OFFSETS) == set(OutputKind)
    assert sorted(SERIES_NUMBER_OFFSETS.values()) == list(range(len(OutputKind)))
    assert output_kinds(["sc"]) == (OutputKind.SC_OVERLAY, OutputKind.SC_PLANES, OutputKind.SC_SURFACE)


# ------------------------------------------------------------------------------- no per-call global flips


def test_read_back_check_does_not_flip_pydicom_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    real = pydicom.dcmread

    def spy(*args: Any, **kwargs: Any) -> Any:
        settings = pydicom.config.settings
        seen.append((settings.reading_validation_mode, settings.writing_validation_mode))
        return real(*args, **kwargs)

    ds = pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir()))))
    monkeypatch.setattr(pydicom, "dcmread", spy)  # what validate calls, through the module
    validate.encode_strict(ds)
    assert seen == [(IGNORE, RAISE)]  # the node's process-wide settings, untouched during the call


def test_read_back_check_still_refuses_an_invalid_value_without_quoting_it() -> None:
    ds = pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir()))))
    # a value no strict writer would take, slipped in as a copied element would be (unvalidated)
    ds.add(DataElement(0x00100010, "PN", "Doe^John^^^^^^^^toolong" * 4, validation_mode=IGNORE))
    with pytest.raises(PipelineError) as info:
        validate.encode_strict(ds)
    assert "PatientName (PN)" in str(info.value)
    assert "Doe" not in str(info.value)


class _Tiny(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def test_prediction_leaves_torch_flags_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ModelRunner(_Tiny(), (4, 8, 8), RunnerSettings(device="cpu", batch_size=1))
    assert torch.are_deterministic_algorithms_enabled()  # set once, when the process builds a model
    assert not torch.backends.cudnn.benchmark
    calls: list[Any] = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(a))
    runner.predict(torch.zeros((6, 10, 10)))
    assert calls == []


def test_send_does_not_touch_pynetdicom_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    dest = Destination(name="nobody", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    item = OutboundFile(path=str(tmp_path / "x.dcm"), sop_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                        transfer_syntax="1.2.840.10008.1.2.1")
    with pytest.raises(DeliveryError):
        send_files(dest, [item], ScuSettings(calling_aet="NODE", connection_timeout=2.0))
    assert _config.STORE_SEND_CHUNKED_DATASET is False


# ------------------------------------------------------------------------------------------------- SCU


@pytest.mark.parametrize("verb", ["echo", "send"])
def test_echo_and_send_associate_with_every_timeout(verb: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    real = AE.associate

    def spy(self: AE, *args: Any, **kwargs: Any) -> Any:
        seen.append((self.acse_timeout, self.dimse_timeout, self.network_timeout, self.connection_timeout))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AE, "associate", spy)
    scp = AE(ae_title="PEER")
    scp.add_supported_context(Verification)
    scp.add_supported_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1")
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    assert server is not None
    settings = ScuSettings(calling_aet="NODE", acse_timeout=11.0, dimse_timeout=12.0, network_timeout=13.0,
                           connection_timeout=14.0)
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
    try:
        if verb == "echo":
            assert echo(dest, settings) == 0x0000
        else:
            ds = pydicom.dcmread(next(iter(sorted(series_dir("P03").iterdir()))))
            path = tmp_path / "sc.dcm"
            ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.save_as(path)
            item = OutboundFile(path=str(path), sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                transfer_syntax="1.2.840.10008.1.2.1")
            assert [r.status for r in send_files(dest, [item], settings)] == [0x0000]
    finally:
        server.shutdown()
    assert seen == [(11.0, 12.0, 13.0, 14.0)]


# --------------------------------------------------------------------------------- explicit errors


def test_committing_a_discarded_incoming_file_is_an_explicit_error(tmp_path: Path) -> None:
    incoming = Spool(tmp_path, fsync=False).incoming()
    incoming.write(memoryview(b"x" * 10))
    incoming.discard()
    with pytest.raises(ValueError, match="already committed or discarded"):
        incoming.commit("1.2.3", "1.2.3.4")


def test_the_node_reads_quietly_and_writes_strictly() -> None:
    """pydicom's WARN mode logs warnings that quote values (patient names among them): not in the node."""
    assert pydicom.config.settings.reading_validation_mode == IGNORE != WARN
    assert pydicom.config.settings.writing_validation_mode == RAISE


# ------------------------------------------------------------------------------ values matched whole


def _anchored_patterns() -> list[str]:
    """Regular expressions in the package that end in ``$``: with ``re.match`` or ``re.search`` that anchor
    lets a final newline through ("NODE\\n" matched an AE title pattern). Values are matched with
    ``fullmatch`` instead."""
    found = []
    for path in sorted(Path(dicomnode.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "re" and node.args):
                continue
            first = node.args[0]
            parts = first.values if isinstance(first, ast.JoinedStr) else [first]
            tail = parts[-1] if parts else None
            if isinstance(tail, ast.Constant) and isinstance(tail.value, str) and tail.value.endswith("$"):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_patterns_are_matched_whole_not_anchored_with_a_dollar() -> None:
    assert _anchored_patterns() == []
