"""Provenance of derived objects: who made them, with which software and which model.

Every output carries, in its ContributingEquipmentSequence, an item for dicomnode with purpose of reference
DCM 109102 "Processing Equipment" (PS3.16 CID 7005: "equipment that has processed composite instances to
create new composite instances"). 109103 "Modifying Equipment" is for equipment that changed an existing
instance in place (coercion of attributes) and 109104 is "De-identifying Equipment"; neither describes an
algorithm that creates new objects from a series. highdicom appends its own item (also 109102) after ours.

The item names the model: ManufacturerModelName = model name, SoftwareVersions = (dicomnode version, model
version), ContributionDescription = pipeline and model. The segments of a SEG and the measurement groups of
an SR also carry the algorithm identification (name, version, family) of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import dicomnode
from dicomnode.imaging.labels import LabelVolume

MANUFACTURER = "dicomnode"


@dataclass(frozen=True)
class Provenance:
    """What produced an output: pipeline, model name/version and the node's own equipment attributes.

    ``device_serial_number`` is Type 1 in the Enhanced General Equipment module of a SEG; it should name the
    node instance (for example its AE title) and must be stable across runs.
    """

    pipeline: str
    model_name: str
    model_version: str
    device_serial_number: str = "dicomnode"
    algorithm_family: str = "ArtificialIntelligence"  # a keyword of CID 7162, e.g. "MorphologicalOperations"
    institution_name: str | None = None
    station_name: str | None = None

    @property
    def software_version(self) -> str:
        return dicomnode.__version__

    @classmethod
    def of(cls, labels: LabelVolume, pipeline: str, **kwargs: str) -> Provenance:
        """Provenance of ``labels`` (model = the label volume's algorithm name and version)."""
        return cls(pipeline=pipeline, model_name=labels.algorithm_name,
                   model_version=labels.algorithm_version, **kwargs)


def contributing_equipment(prov: Provenance) -> list[hd.ContributingEquipment]:
    """ContributingEquipmentSequence items to pass to every highdicom constructor (see module docstring)."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=prov.model_name[:64],
        software_versions=[prov.software_version, prov.model_version[:64]],
        device_serial_number=prov.device_serial_number[:64],
        institution_name=prov.institution_name,
        station_name=prov.station_name,
        contribution_description=f"pipeline {prov.pipeline}: {prov.model_name} {prov.model_version}"[:1024],
    )
    return [item]


def seg_algorithm_identification(prov: Provenance) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification; family from CID 7162 "Segmentation Algorithm Families".

    Raises ValueError when ``prov.algorithm_family`` is not a keyword of CID 7162.
    """
    if prov.algorithm_family not in codes.cid7162.dir(""):
        raise ValueError(f"algorithm family {prov.algorithm_family!r} is not in CID 7162")
    return hd.AlgorithmIdentificationSequence(
        name=prov.model_name[:64],
        family=getattr(codes.cid7162, prov.algorithm_family),
        version=prov.model_version[:64],
        source=MANUFACTURER,
    )


def sr_algorithm_identification(prov: Provenance) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR measurement groups."""
    return hd.sr.AlgorithmIdentification(name=prov.model_name[:64], version=prov.model_version[:64])


def drop_incomplete_study_references(ds: Dataset) -> None:
    """Remove ReferencedStudySequence items copied from a source that lack ReferencedSOPClassUID.

    The sequence is Type 3 in the General Study module, but its items are SOP Instance Reference macros
    (both UIDs Type 1). Some archives (TCIA's de-identification among them) leave only the instance UID;
    copying that verbatim would make every output fail IOD validation, and inventing a class is worse.
    """
    items = [item for item in ds.get("ReferencedStudySequence", []) if "ReferencedSOPClassUID" in item]
    if "ReferencedStudySequence" in ds and not items:
        del ds.ReferencedStudySequence
    elif items:
        ds.ReferencedStudySequence = items
