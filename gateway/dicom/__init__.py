"""The gateway's own asyncio DICOM upper layer (PS3.8) and the few DIMSE messages it speaks (PS3.7).

This package is the only code that touches DICOM sockets and PDUs. See docs/upper-layer.md.
"""
