"""Part-10 header encoding: pydicom reads what we write, and the dataset bytes are never touched."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    PREAMBLE,
    encode_file_meta,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "Doe^Jane"
    ds.Modality = "CT"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x02\x03\x04"
    return ds


def _encode(ds: Dataset, *, little_endian: bool, implicit_vr: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = little_endian
    fp.is_implicit_VR = implicit_vr
    write_dataset(fp, ds)
    return fp.getvalue()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


DATASETS = {
    IMPLICIT_LE: lambda ds: _encode(ds, little_endian=True, implicit_vr=True),
    EXPLICIT_LE: lambda ds: _encode(ds, little_endian=True, implicit_vr=False),
    EXPLICIT_BE: lambda ds: _encode(ds, little_endian=False, implicit_vr=False),
    DEFLATED_LE: lambda ds: _deflate(_encode(ds, little_endian=True, implicit_vr=False)),
}


def _meta_elements(blob: bytes) -> dict[int, tuple[bytes, bytes]]:
    """An independent little parser of the group we wrote: element -> (VR, raw value)."""
    assert blob[:132] == bytes(128) + b"DICM"
    pos, out = 132, {}
    while pos < len(blob):
        group, element, vr = struct.unpack_from("<HH2s", blob, pos)
        assert group == 0x0002
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            (length,) = struct.unpack_from("<I", blob, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", blob, pos + 6)
            pos += 8
        out[element] = (vr, blob[pos : pos + length])
        pos += length
    return out


@pytest.mark.parametrize("syntax", sorted(DATASETS))
def test_pydicom_reads_every_transfer_syntax_and_dataset_bytes_are_untouched(
    tmp_path: Path, syntax: str
) -> None:
    source = _dataset()
    dataset_bytes = DATASETS[syntax](source)
    header = encode_file_meta(CT, "1.2.3.4.5", syntax, "MODALITY1")
    path = tmp_path / "x.dcm"
    path.write_bytes(header + dataset_bytes)

    read = pydicom.dcmread(path)

    meta = read.file_meta
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert meta.TransferSyntaxUID == syntax
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert read.PatientName == "Doe^Jane"
    assert read.Rows == 2
    assert read.PixelData == source.PixelData
    assert path.read_bytes()[len(header) :] == dataset_bytes


def test_group_length_counts_every_following_meta_byte() -> None:
    header = encode_file_meta(CT, "1.2.3", EXPLICIT_LE, "AE")
    elements = _meta_elements(header)
    (group_length,) = struct.unpack("<I", elements[0x0000][1])
    assert group_length == len(header) - 132 - 12
    assert header.startswith(PREAMBLE)


def test_padding_is_nul_for_ui_and_space_for_sh_and_ae() -> None:
    elements = _meta_elements(encode_file_meta("1.2.3", "1.2.34", EXPLICIT_LE, "ODD"))
    assert elements[0x0002] == (b"UI", b"1.2.3\x00")
    assert elements[0x0003] == (b"UI", b"1.2.34")
    assert elements[0x0010] == (b"UI", b"1.2.840.10008.1.2.1\x00")
    assert elements[0x0013] == (b"SH", b"DICOMGW_010 ")
    assert elements[0x0016] == (b"AE", b"ODD ")
    assert elements[0x0001] == (b"OB", b"\x00\x01")


@pytest.mark.parametrize(
    "uid", ["../../x", "/etc/x", "1.2\x003\x00.4", "9" * 200, "1.2.3/../../../tmp/evil"]
)
def test_hostile_uids_are_stored_verbatim_as_values(tmp_path: Path, uid: str) -> None:
    header = encode_file_meta(uid, uid, IMPLICIT_LE, "EVIL")
    elements = _meta_elements(header)
    raw = uid.encode()
    assert elements[0x0002][1].removesuffix(b"\x00" if len(raw) % 2 else b"") == raw
    assert elements[0x0003][1][: len(raw)] == raw
    path = tmp_path / "x.dcm"
    path.write_bytes(header + DATASETS[IMPLICIT_LE](_dataset()))
    assert pydicom.dcmread(path).PatientName == "Doe^Jane"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]


def test_undecodable_bytes_round_trip_through_surrogateescape() -> None:
    uid = b"1.2.\xff\xfe".decode("utf-8", "surrogateescape")
    elements = _meta_elements(encode_file_meta(CT, uid, EXPLICIT_LE, "AE"))
    assert elements[0x0003][1] == b"1.2.\xff\xfe"


def test_a_value_too_long_for_explicit_vr_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(0002,0003\)"):
        encode_file_meta(CT, "1" * 70000, EXPLICIT_LE, "AE")
    assert len(encode_file_meta(CT, "1" * 65534, EXPLICIT_LE, "AE")) > 65534


@settings(max_examples=60)
@given(
    sop_class=st.text(max_size=80),
    sop_instance=st.text(max_size=300),
    syntax=st.sampled_from(sorted(DATASETS)),
    ae=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16),
)
def test_every_value_round_trips_exactly_apart_from_its_pad(
    sop_class: str, sop_instance: str, syntax: str, ae: str
) -> None:
    header = encode_file_meta(sop_class, sop_instance, syntax, ae)
    elements = _meta_elements(header)
    for element, value, pad in (
        (0x0002, sop_class, b"\x00"),
        (0x0003, sop_instance, b"\x00"),
        (0x0010, syntax, b"\x00"),
        (0x0016, ae, b" "),
    ):
        raw = value.encode("utf-8", "surrogateescape")
        stored = elements[element][1]
        assert len(stored) % 2 == 0
        assert stored == (raw + pad if len(raw) % 2 else raw)
