"""Routing header parsing (gateway.header): every transfer syntax family, prefixes, and hostile bytes."""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import dataset_bytes
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.header import (
    DEFLATED_LE,
    EXPLICIT_BE,
    IMPLICIT_LE,
    MAX_ELEMENTS,
    Header,
    HeaderUnreadable,
    PrefixTooShort,
    configure_pydicom,
    header_from_dataset,
    read_header,
    read_header_file,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
US = "1.2.840.10008.5.1.4.1.1.6.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
ROUTING = ("SOPClassUID", "Modality", "InstitutionName")


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (it does not raise) about the malformed bytes some tests feed it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"pydicom test file {name} missing"
    return Path(path)


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def us_dataset(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = US
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "US"
    ds.InstitutionName = "Test Hospital"
    ds.PatientName = "TEST^PATIENT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = ""
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------- transfer syntax families


def test_explicit_little_endian() -> None:
    ds = read_header(encode(us_dataset()), EXPLICIT_LE, ROUTING, complete=True)
    assert (ds.SOPClassUID, ds.Modality, ds.InstitutionName) == (US, "US", "Test Hospital")


def test_implicit_little_endian_from_a_real_file() -> None:
    data = dataset_bytes(sample("MR_small_implicit.dcm"))
    ds = read_header(data, IMPLICIT_LE, ROUTING, complete=True)
    assert (ds.SOPClassUID, ds.Modality, ds.InstitutionName) == (MR, "MR", "TOSHIBA")


def test_big_endian_from_a_real_file() -> None:
    data = dataset_bytes(sample("ExplVR_BigEnd.dcm"))
    ds = read_header(data, EXPLICIT_BE, ROUTING, complete=True)
    assert (ds.SOPClassUID, ds.Modality, ds.InstitutionName) == (US, "US", "GE MEDICAL SYSTEMS")


def test_deflated_from_a_real_file() -> None:
    data = dataset_bytes(sample("image_dfl.dcm"))
    ds = read_header(data, DEFLATED_LE, ("SOPClassUID", "Modality"), complete=True)
    assert (ds.SOPClassUID, ds.Modality) == ("1.2.840.10008.5.1.4.1.1.7", "OT")


def test_a_deflated_prefix_is_enough_when_it_holds_the_needed_elements() -> None:
    data = dataset_bytes(sample("image_dfl.dcm"))
    ds = read_header(data[:1200], DEFLATED_LE, ("SOPClassUID", "Modality"), complete=False)
    assert ds.Modality == "OT"


def test_compressed_pixel_syntaxes_parse_their_explicit_header() -> None:
    data = dataset_bytes(sample("examples_ybr_color.dcm"))
    ds = read_header(data, JPEG_BASELINE, ("SOPClassUID", "Modality"), complete=True)
    assert ds.Modality == "US"


def test_parsing_stops_before_pixel_data_and_after_the_last_needed_element() -> None:
    ds = read_header(dataset_bytes(sample("MR_small_implicit.dcm")), IMPLICIT_LE,
                     ("SOPClassUID",), complete=True)
    assert "SOPClassUID" in ds
    assert "PatientName" not in ds  # (0010,0010) comes after the last needed element
    assert "PixelData" not in read_header(dataset_bytes(sample("MR_small_implicit.dcm")),
                                          IMPLICIT_LE, ("PixelData",), complete=True)


# ------------------------------------------------------------------------------------ prefixes


def test_a_prefix_that_ends_before_the_needed_elements_raises_prefix_too_short() -> None:
    data = encode(us_dataset(ImageComments="x" * 5000, InstitutionName="Far Away"))
    # (0008,0080) InstitutionName follows (0008,0060) Modality; cut between them
    with pytest.raises(PrefixTooShort):
        read_header(data[:40], EXPLICIT_LE, ROUTING, complete=False)


def test_a_prefix_cut_inside_an_element_raises_prefix_too_short() -> None:
    data = encode(us_dataset())
    with pytest.raises(PrefixTooShort):
        read_header(data[: len(data) - 3], EXPLICIT_LE, ("PatientName",), complete=False)


def test_a_prefix_that_holds_everything_is_parsed_without_the_file() -> None:
    data = encode(us_dataset()) + b"\xff" * 100  # whatever follows is never read
    ds = read_header(data[:200], EXPLICIT_LE, ("SOPClassUID", "Modality"), complete=False)
    assert ds.Modality == "US"


def test_read_header_file_reads_from_the_dataset_offset(tmp_path: Path) -> None:
    path = tmp_path / "object.dcm"
    path.write_bytes(b"HEADER-WRITTEN-BY-THE-SPOOL" + encode(us_dataset()))
    ds = read_header_file(path, len(b"HEADER-WRITTEN-BY-THE-SPOOL"), EXPLICIT_LE, ROUTING)
    assert ds.InstitutionName == "Test Hospital"


# ------------------------------------------------------------------------------- hostile bytes


@pytest.mark.parametrize(
    ("data", "syntax"),
    [
        (b"this is not a DICOM dataset, it is text" * 4, EXPLICIT_LE),
        (b"this is not a DICOM dataset, it is text" * 4, IMPLICIT_LE),
        (random.Random(1).randbytes(4096), EXPLICIT_LE),
        (random.Random(2).randbytes(4096), IMPLICIT_LE),
        (random.Random(3).randbytes(4096), EXPLICIT_BE),
        (random.Random(4).randbytes(4096), DEFLATED_LE),
        (b"\x08\x00", EXPLICIT_LE),  # shorter than one element header
    ],
    ids=["text-explicit", "text-implicit", "random-explicit", "random-implicit", "random-be",
         "random-deflate", "two-bytes"],
)
def test_garbage_raises_header_unreadable(data: bytes, syntax: str) -> None:
    with pytest.raises(HeaderUnreadable):
        read_header(data, syntax, ROUTING, complete=True)


def test_garbage_declared_deflated_raises_header_unreadable_even_as_a_prefix() -> None:
    with pytest.raises(HeaderUnreadable, match="inflated"):
        read_header(b"\xff" * 2000, DEFLATED_LE, ROUTING, complete=False)


def test_an_element_overrunning_a_complete_dataset_raises_header_unreadable() -> None:
    data = encode(us_dataset())
    with pytest.raises(HeaderUnreadable):
        read_header(data[: len(data) - 3], EXPLICIT_LE, ("PatientName",), complete=True)


def test_a_flood_of_elements_is_refused_quickly() -> None:
    """64 MiB of zeros parse as 8 million empty elements (~20 s of CPU): capped instead."""
    with pytest.raises(HeaderUnreadable, match=str(MAX_ELEMENTS)):
        read_header(bytes(64 << 20), IMPLICIT_LE, ROUTING, complete=True)


def test_a_deflate_bomb_is_inflated_only_up_to_the_header_cap() -> None:
    """100 MiB of zeros in front of the SOP Class UID deflate to ~100 KB; inflating all of it is
    refused: the header parse sees at most 64 MiB, which ends inside the big element."""
    big = 100 << 20
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(struct.pack("<HH2s2xL", 0x0008, 0x0002, b"OB", big))]
    parts += [compressor.compress(bytes(1 << 20)) for _ in range(100)]
    parts.append(compressor.compress(encode(us_dataset())))
    bomb = b"".join(parts) + compressor.flush()
    assert len(bomb) < 1 << 20
    with pytest.raises(HeaderUnreadable, match="ends inside a data element"):
        read_header(bomb, DEFLATED_LE, ROUTING, complete=True)


# ----------------------------------------------------------------------- header_from_dataset


def test_header_from_dataset_keeps_values_as_strings() -> None:
    ds = read_header(encode(us_dataset()), EXPLICIT_LE,
                     ("Modality", "PatientName", "ImageType", "StudyDescription", "AccessionNumber"),
                     complete=True)
    header = header_from_dataset(
        ds, ("Modality", "PatientName", "ImageType", "StudyDescription", "AccessionNumber"),
        calling_ae="US_ROOM3", called_ae="DICOMGW", source_ip="127.0.0.1")
    assert header == Header("US_ROOM3", "DICOMGW", "127.0.0.1", {
        "Modality": ("US",),
        "PatientName": ("TEST^PATIENT",),
        "ImageType": ("ORIGINAL", "PRIMARY"),
        "StudyDescription": (),  # present but empty
    })  # AccessionNumber is absent, so it is missing from the mapping


def _explicit_element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def test_values_are_not_validated_and_one_that_cannot_be_converted_is_unreadable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure_pydicom()  # what the gateway's composition root does
    data = (_explicit_element(0x0008, 0x0016, b"UI", b"1.2.3\0")
            + _explicit_element(0x0020, 0x0013, b"IS", b"7 SECRET")  # not an integer string
            + _explicit_element(0x0028, 0x0010, b"US", b"\x53\x45\x43"))  # odd length
    dataset = read_header(data, EXPLICIT_LE, ["SOPClassUID", "InstanceNumber", "Rows"], complete=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        header = header_from_dataset(dataset, ["InstanceNumber"], calling_ae="A", called_ae="B",
                                     source_ip="192.0.2.1")
        with pytest.raises(HeaderUnreadable, match="cannot read Rows") as raised:
            header_from_dataset(dataset, ["Rows"], calling_ae="A", called_ae="B",
                                source_ip="192.0.2.1")

    assert header.attributes["InstanceNumber"] == ("7 SECRET",)  # routed on as stored
    assert "SEC" not in str(raised.value)  # the raw bytes stay out of the message
    assert not caught and "SECRET" not in caplog.text  # no validation warning quoting the value
