"""Images as arrays: spool files -> :class:`~dicomnode.imaging.volume.Volume` (z, y, x; LPS affine; HU).

Decoding (:mod:`.pixels`, :mod:`.frames`), slice geometry (:mod:`.geometry`), the volume loader
(:mod:`.volume`), preprocessing (:mod:`.preprocess`), classical masks and label volumes (:mod:`.masks`,
:mod:`.labels`) and NIfTI export (:mod:`.nifti`). Pure computation on files and arrays (torch only for resampling in
:mod:`.preprocess`): may import ``errors`` only, never the network or the store.
"""
