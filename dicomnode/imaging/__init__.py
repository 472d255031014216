"""Images as arrays: spool files -> :class:`~dicomnode.imaging.volume.Volume` (z, y, x; LPS affine; HU).

Decoding (:mod:`.pixels`, :mod:`.frames`), slice geometry (:mod:`.geometry`), the volume loader
(:mod:`.volume`), preprocessing functions (:mod:`.preprocess`) and the declarative chain a pipeline configures
from them (:mod:`.chain`), classical masks and label volumes (:mod:`.masks`, :mod:`.labels`), label names to
SNOMED CT codes (:mod:`.codes`) and NIfTI export (:mod:`.nifti`). Pure computation on files and arrays (torch
only for resampling in :mod:`.preprocess` and :mod:`.chain`): may import ``config`` and ``errors`` only, never
the network or the store.
"""
