"""Label names to SNOMED CT codes: the configuration's codes first, then TotalSegmentator's shipped mapping, then
the package's table; sides in names become laterality; unknown names get a generic code and say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicomnode.config import LabelCode, parse_config
from dicomnode.imaging.codes import GENERIC_TYPE, coded_label, normalise, totalsegmentator_table
from dicomnode.imaging.labels import LEFT, RIGHT, LabelVolume
from dicomnode.imaging.volume import load_series_dir
from tests.conftest import series_dir
from tests.model_checks import seg_round_trip


def test_lookup_order_and_sides() -> None:
    assert len(totalsegmentator_table()) > 150  # the mapping TotalSegmentator ships
    liver = coded_label(3, "Liver")
    assert (liver.value, liver.type.value, liver.type.scheme, liver.description) == (3, "10200004", "SCT", None)
    lobe = coded_label(1, "lung_upper_lobe_left")  # from TotalSegmentator's CSV, with its colour and laterality
    assert lobe.type.value == "45653009" and lobe.laterality == LEFT and lobe.color_rgb != (255, 0, 0)
    kidney = coded_label(2, "Right Kidney")  # not in any table as such: side word stripped -> Kidney, Right
    assert kidney.type.value == "64033007" and kidney.laterality == RIGHT
    tumour = coded_label(4, "tumour")  # the package's table: a finding, not an anatomical structure
    assert tumour.category.value == "49755003" and tumour.type.value == "108369006"
    override = coded_label(5, "liver", [LabelCode("liver", "999999", "Custom liver", "99TEST")])
    assert (override.type.value, override.type.scheme, override.type.meaning) == ("999999", "99TEST", "Custom liver")
    unknown = coded_label(6, "widget")
    assert unknown.type == GENERIC_TYPE and unknown.description is not None and "widget" in unknown.description
    assert normalise(" Left-Lung  upper ") == "left_lung_upper"


def test_config_codes_reach_the_seg_and_generic_codes_are_described(tmp_path: Path) -> None:
    cfg = parse_config({"pipelines": [{"name": "p", "kind": "segment", "model": {
        "kind": "lung", "codes": [{"label": "blob", "code": "123456", "meaning": "Blob", "laterality": "left"}]}}]})
    codes = cfg.pipelines[0].model.codes
    volume = load_series_dir(series_dir("P03"))
    data = np.zeros(volume.shape, dtype=np.uint8)
    data[10:14, 200:260, 200:260] = 1
    data[10:14, 300:340, 300:340] = 2
    labels = LabelVolume(data, (coded_label(1, "blob", codes), coded_label(2, "widget", codes)), "test", "1")
    seg = seg_round_trip(volume, labels, tmp_path)
    blob, widget = seg.SegmentSequence
    assert blob.SegmentedPropertyTypeCodeSequence[0].CodeValue == "123456"
    assert blob.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == \
        LEFT.value
    assert "SegmentDescription" not in blob
    assert widget.SegmentedPropertyTypeCodeSequence[0].CodeValue == GENERIC_TYPE.value
    assert widget.SegmentDescription.startswith("no SNOMED CT code known for 'widget'")
