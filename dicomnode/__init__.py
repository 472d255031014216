"""dicomnode: a DICOM processing node.

Receives DICOM instances over the network, assembles them by SeriesInstanceUID, runs image pipelines on
complete series and sends the derived objects back to PACS. See README.md for the data path.
"""

__version__ = "0.1.0"
