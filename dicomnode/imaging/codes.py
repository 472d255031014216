"""Label names to coded concepts (SNOMED CT): what a model's label becomes in the SEG's segments and the SR.

:func:`coded_label` looks a label name up, in order, in:

1. the codes the pipeline's configuration gives (``model.codes``: label name -> code, meaning, laterality);
2. the mapping TotalSegmentator ships (``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``,
   read as a data file when the package is installed, never imported), which also gives display colours;
3. the package's table :data:`TABLE` (common organs and findings of other models).

Names compare case-insensitively with spaces, hyphens and underscores alike; a ``left``/``right`` word in a
name not found as such is looked up without it and becomes the laterality (``kidney_left`` -> Kidney, Left).
A name found nowhere gets the generic type (SCT 85756007 Tissue) and a segment description that says so: the
SEG never carries a made-up code silently.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from dicomnode.imaging.labels import ANATOMICAL_STRUCTURE, LEFT, RIGHT, Code, LabelInfo

MORPHOLOGY = Code("49755003", "SCT", "Morphologically Altered Structure")
GENERIC_TYPE = Code("85756007", "SCT", "Tissue")
TOTALSEG_CSV = ("resources", "totalsegmentator_snomed_mapping.csv")

# name -> (type code, type meaning, category); laterality comes from the name
TABLE: dict[str, tuple[str, str, Code]] = {
    "lung": ("39607008", "Lung", ANATOMICAL_STRUCTURE),
    "airways": ("89187006", "Airway structure", ANATOMICAL_STRUCTURE),
    "body": ("38266002", "Entire body", ANATOMICAL_STRUCTURE),
    "brain": ("12738006", "Brain", ANATOMICAL_STRUCTURE),
    "liver": ("10200004", "Liver", ANATOMICAL_STRUCTURE),
    "spleen": ("78961009", "Spleen", ANATOMICAL_STRUCTURE),
    "pancreas": ("15776009", "Pancreas", ANATOMICAL_STRUCTURE),
    "kidney": ("64033007", "Kidney", ANATOMICAL_STRUCTURE),
    "heart": ("80891009", "Heart", ANATOMICAL_STRUCTURE),
    "aorta": ("15825003", "Aorta", ANATOMICAL_STRUCTURE),
    "stomach": ("69695003", "Stomach", ANATOMICAL_STRUCTURE),
    "gallbladder": ("28231008", "Gallbladder", ANATOMICAL_STRUCTURE),
    "urinary_bladder": ("89837001", "Urinary bladder", ANATOMICAL_STRUCTURE),
    "bladder": ("89837001", "Urinary bladder", ANATOMICAL_STRUCTURE),
    "prostate": ("41216001", "Prostate", ANATOMICAL_STRUCTURE),
    "esophagus": ("32849002", "Esophagus", ANATOMICAL_STRUCTURE),
    "trachea": ("44567001", "Trachea", ANATOMICAL_STRUCTURE),
    "colon": ("71854001", "Colon", ANATOMICAL_STRUCTURE),
    "duodenum": ("38848004", "Duodenum", ANATOMICAL_STRUCTURE),
    "adrenal_gland": ("23451007", "Adrenal gland", ANATOMICAL_STRUCTURE),
    "thyroid_gland": ("69748006", "Thyroid", ANATOMICAL_STRUCTURE),
    "spinal_cord": ("2748008", "Spinal cord", ANATOMICAL_STRUCTURE),
    "skin": ("39937001", "Skin", ANATOMICAL_STRUCTURE),
    "bone": ("272673000", "Bone", ANATOMICAL_STRUCTURE),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", ANATOMICAL_STRUCTURE),
    "portal_vein": ("32764006", "Portal vein", ANATOMICAL_STRUCTURE),
    "pulmonary_artery": ("81040000", "Pulmonary artery", ANATOMICAL_STRUCTURE),
    "femur": ("71341001", "Femur", ANATOMICAL_STRUCTURE),
    "tumor": ("108369006", "Neoplasm", MORPHOLOGY),
    "tumour": ("108369006", "Neoplasm", MORPHOLOGY),
    "neoplasm": ("108369006", "Neoplasm", MORPHOLOGY),
}
_SIDES = {"left": LEFT, "right": RIGHT}


class CodeOverride(Protocol):
    """A configured code (``dicomnode.config.LabelCode``)."""

    @property
    def label(self) -> str: ...
    @property
    def code(self) -> str: ...
    @property
    def meaning(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def laterality(self) -> str | None: ...


def normalise(name: str) -> str:
    """Lower case, runs of spaces/hyphens/underscores as one underscore."""
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


@functools.lru_cache(maxsize=1)
def totalsegmentator_table() -> Mapping[str, LabelInfo]:
    """TotalSegmentator's shipped SNOMED CT mapping (empty when the package is not installed), value 0."""
    spec = importlib.util.find_spec("totalsegmentator")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin).parent.joinpath(*TOTALSEG_CSV)
    if not path.is_file():
        return {}
    out: dict[str, LabelInfo] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            out[normalise(row["Structure"])] = _row_info(row)
    return out


def _row_info(row: Mapping[str, str]) -> LabelInfo:
    def code(prefix: str) -> Code | None:
        value = row.get(f"{prefix}.CodeValue", "")
        if not value:
            return None
        return Code(value, row[f"{prefix}.CodingSchemeDesignator"], row[f"{prefix}.CodeMeaning"])

    category = code("SegmentedPropertyCategoryCodeSequence") or ANATOMICAL_STRUCTURE
    type_ = code("SegmentedPropertyTypeCodeSequence") or GENERIC_TYPE
    modifier = code("SegmentedPropertyTypeModifierCodeSequence")
    laterality = modifier if modifier is not None and modifier.value in (LEFT.value, RIGHT.value) else None
    rgb = tuple(int(c) for c in row.get("DicomRGBColor", "").split(",") if c.strip().isdigit())
    color = (rgb[0], rgb[1], rgb[2]) if len(rgb) == 3 else (255, 0, 0)
    return LabelInfo(0, row["Structure"], category, type_, laterality, color)


def _colour(value: int) -> tuple[int, int, int]:
    """A deterministic distinct-ish display colour for label ``value`` (golden-ratio hues)."""
    hue = (value * 0.618033988749895) % 1.0
    i, f = int(hue * 6), hue * 6 - int(hue * 6)
    q, t = int(255 * (1 - f)), int(255 * f)
    return [(255, t, 0), (q, 255, 0), (0, 255, t), (0, q, 255), (t, 0, 255), (255, 0, q)][i % 6]


def _lookup(key: str, overrides: Mapping[str, CodeOverride]) -> tuple[Code, Code, Code | None,
                                                                      tuple[int, int, int] | None] | None:
    """(category, type, laterality, colour or None) for a normalised name, without side handling."""
    if key in overrides:
        o = overrides[key]
        side = _SIDES.get(o.laterality) if o.laterality else None
        return ANATOMICAL_STRUCTURE, Code(o.code, o.scheme, o.meaning), side, None
    found = totalsegmentator_table().get(key)
    if found is not None:
        return found.category, found.type, found.laterality, found.color_rgb
    if key in TABLE:
        value, meaning, category = TABLE[key]
        return category, Code(value, "SCT", meaning), None, None
    return None


def coded_label(value: int, name: str, overrides: Iterable[CodeOverride] = ()) -> LabelInfo:
    """The LabelInfo of label ``value`` named ``name`` (see the module docstring for the lookup order)."""
    by_name = {normalise(o.label): o for o in overrides}
    key = normalise(name)
    found = _lookup(key, by_name)
    if found is None:
        words = key.split("_")
        sides = [w for w in words if w in _SIDES]
        if len(sides) == 1:
            found = _lookup("_".join(w for w in words if w not in _SIDES), by_name)
            if found is not None and found[2] is None:
                found = (found[0], found[1], _SIDES[sides[0]], found[3])
    if found is None:
        note = f"no SNOMED CT code known for {name!r}: generic code {GENERIC_TYPE.meaning}"
        return LabelInfo(value, name, ANATOMICAL_STRUCTURE, GENERIC_TYPE, None, _colour(value), note[:64])
    category, type_, laterality, colour = found
    return LabelInfo(value, name, category, type_, laterality, colour or _colour(value))
