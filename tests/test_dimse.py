"""DIMSE command-set codec (gateway.dicom.dimse): round trips, and commands as DCMTK writes them.

pydicom's implicit VR little endian writer is the independent reference: commands it writes (the way
DCMTK and pynetdicom encode them, group length first, UIDs padded with NUL) must decode, and what we
encode it must read back with the same values.
"""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from gateway.dicom import dimse
from gateway.errors import ProtocolError

US = "1.2.840.10008.5.1.4.1.1.6.1"
MWL = "1.2.840.10008.5.1.4.31"
VERIFICATION = "1.2.840.10008.1.1"
ODD_UID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded with one NUL on the wire


def pydicom_command(**elements: object) -> bytes:
    """An implicit VR little endian command set written by pydicom, with its group length."""
    body = Dataset()
    for keyword, value in elements.items():
        setattr(body, keyword, value)
    encoded = _implicit(body)
    full = Dataset()
    full.CommandGroupLength = len(encoded)
    return _implicit(full) + encoded


def _implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


def pydicom_read(data: bytes) -> Dataset:
    return read_dataset(io.BytesIO(data), is_implicit_VR=True, is_little_endian=True)


# ------------------------------------------------------------------------------ round trips


def test_echo_request_and_response_round_trip() -> None:
    request = dimse.decode_command(dimse.echo_rq(7))
    assert (request.command_field, request.message_id, request.sop_class_uid) == (
        dimse.C_ECHO_RQ, 7, VERIFICATION)
    assert not request.has_dataset
    response = dimse.decode_command(dimse.echo_rsp(request))
    assert (response.command_field, response.responded_id, response.status) == (
        dimse.C_ECHO_RSP, 7, dimse.SUCCESS)
    assert response.sop_class_uid == VERIFICATION
    assert not response.has_dataset


def test_store_request_and_response_round_trip() -> None:
    request = dimse.decode_command(dimse.store_rq(65535, US, ODD_UID, priority=2))
    assert request.command_field == dimse.C_STORE_RQ
    assert (request.message_id, request.priority) == (65535, 2)
    assert (request.sop_class_uid, request.sop_instance_uid) == (US, ODD_UID)  # NUL pad removed
    assert request.has_dataset
    response = dimse.decode_command(dimse.store_rsp(request, dimse.OUT_OF_RESOURCES, "spool full"))
    assert response.command_field == dimse.C_STORE_RSP
    assert (response.responded_id, response.status) == (65535, 0xA700)
    assert (response.sop_class_uid, response.sop_instance_uid) == (US, ODD_UID)
    assert response.error_comment == "spool full"
    assert not response.has_dataset


def test_a_store_response_error_comment_is_cut_to_64_characters() -> None:
    request = dimse.decode_command(dimse.store_rq(1, US, "1.2.3"))
    response = dimse.decode_command(dimse.store_rsp(request, dimse.STORE_CANNOT_UNDERSTAND, "x" * 300))
    assert response.error_comment == "x" * 64


def test_find_request_pending_and_final_responses_round_trip() -> None:
    request = dimse.decode_command(dimse.find_rq(3, MWL))
    assert (request.command_field, request.sop_class_uid, request.has_dataset) == (
        dimse.C_FIND_RQ, MWL, True)
    pending = dimse.decode_command(dimse.find_rsp(request, dimse.PENDING, True))
    assert (pending.status, pending.has_dataset, pending.responded_id) == (0xFF00, True, 3)
    final = dimse.decode_command(dimse.find_rsp(request, dimse.SUCCESS, False))
    assert (final.status, final.has_dataset) == (0, False)


def test_cancel_request_round_trips() -> None:
    cancel = dimse.decode_command(dimse.cancel_rq(12))
    assert (cancel.command_field, cancel.responded_id, cancel.has_dataset) == (0x0FFF, 12, False)


def test_the_group_length_counts_every_following_byte() -> None:
    data = dimse.store_rq(1, US, ODD_UID)
    assert struct.unpack_from("<HHL", data, 0) == (0, 0, 4)
    (length,) = struct.unpack_from("<L", data, 8)
    assert length == len(data) - 12


@given(message_id=st.integers(0, 0xFFFF), status=st.integers(0, 0xFFFF),
       uid=st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,20}){1,10}", fullmatch=True))
def test_store_response_round_trips_any_id_status_and_uid(message_id: int, status: int,
                                                          uid: str) -> None:
    request = dimse.decode_command(dimse.store_rq(message_id, US, uid))
    response = dimse.decode_command(dimse.store_rsp(request, status))
    assert (response.responded_id, response.status, response.sop_instance_uid) == (
        message_id, status, uid)


# ---------------------------------------------------------------- against pydicom's encoding


def test_pydicom_reads_our_store_request_with_the_same_values() -> None:
    ds = pydicom_read(dimse.store_rq(42, US, ODD_UID, priority=1))
    assert ds.CommandGroupLength == len(dimse.store_rq(42, US, ODD_UID, priority=1)) - 12
    assert ds.AffectedSOPClassUID == US
    assert ds.AffectedSOPInstanceUID == ODD_UID
    assert (ds.CommandField, ds.MessageID, ds.Priority) == (1, 42, 1)
    assert ds.CommandDataSetType != 0x0101


def test_pydicom_reads_our_store_response() -> None:
    request = dimse.decode_command(dimse.store_rq(9, US, ODD_UID))
    ds = pydicom_read(dimse.store_rsp(request, 0xB000, "coerced"))
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 9, 0xB000)
    assert ds.CommandDataSetType == 0x0101
    assert ds.ErrorComment == "coerced"
    assert ds.AffectedSOPInstanceUID == ODD_UID


def test_decodes_a_dcmtk_style_store_request() -> None:
    data = pydicom_command(
        AffectedSOPClassUID=US, CommandField=0x0001, MessageID=513, Priority=0,
        CommandDataSetType=0x0000, AffectedSOPInstanceUID=ODD_UID,
        MoveOriginatorApplicationEntityTitle="MOVESCU", MoveOriginatorMessageID=77,
    )
    command = dimse.decode_command(data)
    assert command.command_field == dimse.C_STORE_RQ
    assert (command.message_id, command.priority, command.has_dataset) == (513, 0, True)
    assert (command.sop_class_uid, command.sop_instance_uid) == (US, ODD_UID)
    assert (command.move_originator_ae, command.move_originator_id) == ("MOVESCU", 77)


def test_decodes_a_dcmtk_style_echo_request_and_store_response() -> None:
    echo = dimse.decode_command(pydicom_command(
        AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=1,
        CommandDataSetType=0x0101))
    assert (echo.command_field, echo.message_id, echo.has_dataset) == (dimse.C_ECHO_RQ, 1, False)
    response = dimse.decode_command(pydicom_command(
        AffectedSOPClassUID=US, CommandField=0x8001, MessageIDBeingRespondedTo=5,
        CommandDataSetType=0x0101, Status=0xA700, AffectedSOPInstanceUID="1.2.3.4",
        ErrorComment="Out of resources", ErrorID=3, OffendingElement=[0x00080018]))
    assert (response.status, response.responded_id, response.error_comment) == (
        0xA700, 5, "Out of resources")


def test_decodes_requested_sop_uids_as_the_sop_uids() -> None:
    command = dimse.decode_command(pydicom_command(
        RequestedSOPClassUID=US, CommandField=0x0001, MessageID=2, CommandDataSetType=1,
        RequestedSOPInstanceUID="1.2.3"))
    assert (command.sop_class_uid, command.sop_instance_uid) == (US, "1.2.3")


def test_a_command_without_a_data_set_type_has_no_dataset() -> None:
    command = dimse.decode_command(pydicom_command(CommandField=0x0030, MessageID=1))
    assert not command.has_dataset


def test_a_command_without_group_length_decodes() -> None:
    body = Dataset()
    body.CommandField = 0x0030
    body.MessageID = 4
    command = dimse.decode_command(_implicit(body))
    assert (command.command_field, command.message_id) == (0x0030, 4)


# ------------------------------------------------------------------------- malformed commands


def test_a_command_without_command_field_raises() -> None:
    with pytest.raises(ProtocolError, match="no Command Field"):
        dimse.decode_command(pydicom_command(MessageID=1))


def test_an_element_overrunning_the_command_raises() -> None:
    data = dimse.echo_rq(1) + struct.pack("<HHL", 0, 0x0902, 1000) + b"short"
    with pytest.raises(ProtocolError, match="overruns"):
        dimse.decode_command(data)


def test_trailing_bytes_after_the_last_element_raise() -> None:
    with pytest.raises(ProtocolError, match="trailing"):
        dimse.decode_command(dimse.echo_rq(1) + b"\0\0\0")


def test_a_us_element_of_the_wrong_length_raises() -> None:
    bad = struct.pack("<HHL", 0, 0x0100, 4) + b"\x30\0\0\0"
    with pytest.raises(ProtocolError, match="2 bytes"):
        dimse.decode_command(bad)


def test_elements_outside_group_zero_are_skipped() -> None:
    data = dimse.echo_rq(3) + struct.pack("<HHL", 0x0008, 0x0016, 4) + b"1.2\0"
    assert dimse.decode_command(data).message_id == 3


def test_an_empty_command_raises() -> None:
    with pytest.raises(ProtocolError):
        dimse.decode_command(b"")
