"""dicomnode: a DICOM processing node.

Receives DICOM instances over the network, assembles them by SeriesInstanceUID, runs image pipelines on
complete series and sends the derived objects back to PACS. See README.md for the data path.
"""

__version__ = "0.1.0"

#: Implementation Class UID (PS3.7 D.3.3.2) announced in associations and written to file meta: derived once
#: from the dicomnode UID namespace (see dicomnode.outputs.uids), fixed for ever.
IMPLEMENTATION_CLASS_UID = "2.25.191213753240751524790990946635959156242"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"  # SH, at most 16 characters
