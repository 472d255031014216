"""Label volumes: what a Segmenter returns and what the encoders turn into SEG, SC and SR.

A :class:`LabelVolume` lies on exactly the grid of the :class:`~dicomnode.imaging.volume.Volume` it was computed from
(same shape, same affine). Label values are small positive integers; 0 is background. Each value is described
by a :class:`LabelInfo` with coded concepts, so the DICOM encoders need no knowledge of particular models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM Code Sequence item): value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


# Segmented property categories and types (SNOMED CT), used by the built-in segmenters.
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
ORGAN = Code("91772007", "SCT", "Organ")  # DICOM CID 7151/7166; 113343008 is "Body organ structure"
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")


@dataclass(frozen=True)
class LabelInfo:
    """One label value of a :class:`LabelVolume` (``value`` >= 1; 0 is background)."""

    value: int
    name: str  # human-readable segment label, e.g. "Left lung"
    category: Code
    type: Code
    laterality: Code | None = None
    color_rgb: tuple[int, int, int] = (255, 0, 0)  # display colour for overlays and the SEG's recommended colour
    description: str | None = None  # the SEG's SegmentDescription: e.g. that a generic code stands in


LUNG_LEFT = LabelInfo(2, "Left lung", ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung"), LEFT, (80, 160, 255))
LUNG_RIGHT = LabelInfo(1, "Right lung", ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung"), RIGHT, (255, 170, 60))
AIRWAYS = LabelInfo(3, "Airways", ANATOMICAL_STRUCTURE, Code("89187006", "SCT", "Airway structure"), None,
                    (120, 220, 120))
BODY = LabelInfo(1, "Body", ANATOMICAL_STRUCTURE, Code("38266002", "SCT", "Entire body"), None, (255, 220, 0))
BRAIN = LabelInfo(1, "Brain", ANATOMICAL_STRUCTURE, Code("12738006", "SCT", "Brain"), None, (255, 90, 200))


@dataclass(frozen=True, eq=False)
class LabelVolume:
    """Integer labels (z, y, x), uint8, on the grid of the source Volume, with their descriptions.

    ``algorithm_name`` and ``algorithm_version`` identify what produced the labels; they are stamped into
    the SEG's algorithm identification and the outputs' ContributingEquipmentSequence.
    """

    data: npt.NDArray[np.uint8]
    labels: tuple[LabelInfo, ...]
    algorithm_name: str
    algorithm_version: str
    algorithm_type: str = "AUTOMATIC"

    def mask(self, value: int) -> npt.NDArray[np.bool_]:
        """Boolean mask of one label value."""
        return np.asarray(self.data == value)

    def label(self, value: int) -> LabelInfo:
        for info in self.labels:
            if info.value == value:
                return info
        raise KeyError(value)
