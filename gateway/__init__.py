"""dicom-gateway: one DICOM Application Entity between modalities, RIS and PACS."""

__version__ = "0.1.0"
