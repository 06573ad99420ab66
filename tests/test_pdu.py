"""PDU codec (gateway.dicom.pdu): round trips, byte layouts from PS3.8 9.3, and hostile bodies.

pynetdicom's own PDU classes serve as an independent codec: what we encode it must decode to the
same values, and what it encodes we must decode.
"""

from __future__ import annotations

import os
import struct
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from gateway.dicom import pdu
from gateway.dicom.requestor import SEND_BLOCK, read_pdus
from gateway.dicom.sending import encode_message, send_message
from gateway.errors import ProtocolError

CT = "1.2.840.10008.5.1.4.1.1.2"
US = "1.2.840.10008.5.1.4.1.1.6.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def split(data: bytes) -> tuple[int, bytes]:
    """(PDU type, body) of one encoded PDU, checking the header's declared length."""
    pdu_type, length = pdu.HEADER.unpack_from(data)
    assert length == len(data) - 6
    return pdu_type, data[6:]


def sample_rq() -> pdu.AssociateRQ:
    return pdu.AssociateRQ(
        called_ae="DICOMGW",
        calling_ae="US_ROOM3",
        application_context=pdu.APPLICATION_CONTEXT,
        contexts=(
            pdu.ContextProposal(1, VERIFICATION, (IMPLICIT,)),
            pdu.ContextProposal(3, US, (JPEG_BASELINE, EXPLICIT, IMPLICIT)),
            pdu.ContextProposal(5, CT, (EXPLICIT,)),
        ),
        user_info=pdu.UserInfo(
            max_pdu=16384,
            implementation_class_uid="1.2.826.0.1.3680043.9.1234",
            implementation_version="TEST_1",
            roles=(pdu.RoleSelection(CT, True, False),),
        ),
    )


# ------------------------------------------------------------------------------- round trips


def test_associate_rq_round_trips() -> None:
    rq = sample_rq()
    pdu_type, body = split(pdu.encode_associate_rq(rq))
    assert pdu_type == pdu.ASSOCIATE_RQ
    assert pdu.decode_associate_rq(body) == rq


def test_associate_rq_fixed_fields_follow_ps38_table_9_11() -> None:
    _, body = split(pdu.encode_associate_rq(sample_rq()))
    assert struct.unpack_from(">H", body, 0) == (1,)  # protocol version
    assert body[2:4] == b"\0\0"
    assert body[4:20] == b"DICOMGW".ljust(16)  # called AE, space padded
    assert body[20:36] == b"US_ROOM3".ljust(16)  # calling AE
    assert body[36:68] == bytes(32)
    assert body[68] == 0x10  # the application context item comes first


def test_associate_ac_round_trips_accepted_contexts() -> None:
    ac = pdu.AssociateAC(
        "DICOMGW", "US_ROOM3", pdu.APPLICATION_CONTEXT,
        (pdu.ContextResult(1, 0, IMPLICIT), pdu.ContextResult(3, 0, JPEG_BASELINE)),
        pdu.UserInfo(262144, "1.2.3.4", "DICOMGW_010", (pdu.RoleSelection(CT, True, False),)),
    )
    pdu_type, body = split(pdu.encode_associate_ac(ac))
    assert pdu_type == pdu.ASSOCIATE_AC
    assert pdu.decode_associate_ac(body) == ac


def test_a_rejected_context_still_carries_a_transfer_syntax_sub_item() -> None:
    ac = pdu.AssociateAC("A", "B", pdu.APPLICATION_CONTEXT, (pdu.ContextResult(7, 3),))
    decoded = pdu.decode_associate_ac(split(pdu.encode_associate_ac(ac))[1])
    (result,) = decoded.contexts
    assert (result.id, result.result) == (7, 3)
    assert result.transfer_syntax  # one (insignificant) syntax is always present


@pytest.mark.parametrize(("result", "source", "reason"), [(1, 1, 7), (2, 3, 2), (1, 2, 2), (1, 1, 3)])
def test_associate_rj_round_trips(result: int, source: int, reason: int) -> None:
    data = pdu.encode_associate_rj(pdu.AssociateRJ(result, source, reason))
    assert data == bytes((3, 0, 0, 0, 0, 4, 0, result, source, reason))
    assert pdu.decode_associate_rj(split(data)[1]) == pdu.AssociateRJ(result, source, reason)


def test_release_pdus_are_the_fixed_ten_bytes() -> None:
    assert pdu.encode_release_rq() == bytes((5, 0, 0, 0, 0, 4, 0, 0, 0, 0))
    assert pdu.encode_release_rp() == bytes((6, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def test_abort_round_trips_source_and_reason() -> None:
    data = pdu.encode_abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_UNEXPECTED_PDU)
    assert data == bytes((7, 0, 0, 0, 0, 4, 0, 0, 2, 2))
    assert pdu.decode_abort(split(data)[1]) == (2, 2)


def test_a_short_abort_body_decodes_as_unspecified() -> None:
    assert pdu.decode_abort(b"\0") == (pdu.ABORT_SOURCE_USER, pdu.ABORT_REASON_NOT_SPECIFIED)


def test_pdata_round_trips_one_pdv() -> None:
    data = pdu.encode_pdata(5, 0x03, b"command bytes")
    pdu_type, body = split(data)
    assert pdu_type == pdu.P_DATA_TF
    assert body[:6] == struct.pack(">LBB", len(b"command bytes") + 2, 5, 0x03)
    [(context_id, control, fragment)] = list(pdu.iter_pdvs(memoryview(body)))
    assert (context_id, control, bytes(fragment)) == (5, 0x03, b"command bytes")


def test_iter_pdvs_walks_several_pdvs_of_one_pdu() -> None:
    pdvs = [(1, 0x01, b"abc"), (1, 0x03, b""), (3, 0x00, b"x" * 1000), (3, 0x02, b"end")]
    body = b"".join(struct.pack(">LBB", len(d) + 2, c, m) + d for c, m, d in pdvs)
    assert [(c, m, bytes(d)) for c, m, d in pdu.iter_pdvs(memoryview(body))] == pdvs


def test_pdata_fragments_are_views_of_the_body_not_copies() -> None:
    body = bytearray(split(pdu.encode_pdata(1, 0, b"0123456789"))[1])
    [(_, _, fragment)] = list(pdu.iter_pdvs(memoryview(body)))
    body[-1] = ord("X")
    assert bytes(fragment) == b"012345678X"


@given(
    called=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16),
    calling=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=16),
    contexts=st.lists(
        st.tuples(
            st.from_regex(r"1\.2\.[0-9]{1,20}(\.[0-9]{1,10}){0,5}", fullmatch=True),
            st.lists(st.sampled_from([IMPLICIT, EXPLICIT, JPEG_BASELINE, "1.2.840.10008.1.2.5"]),
                     min_size=1, max_size=4),
        ),
        max_size=20,
    ),
    max_pdu=st.integers(0, 0xFFFFFFFF),
)
def test_associate_rq_round_trips_any_proposal(
    called: str, calling: str, contexts: list[tuple[str, list[str]]], max_pdu: int
) -> None:
    proposals = tuple(pdu.ContextProposal(2 * i + 1, abstract, tuple(syntaxes))
                      for i, (abstract, syntaxes) in enumerate(contexts))
    rq = pdu.AssociateRQ(called, calling, pdu.APPLICATION_CONTEXT, proposals, pdu.UserInfo(max_pdu))
    assert pdu.decode_associate_rq(split(pdu.encode_associate_rq(rq))[1]) == rq


@given(st.lists(st.tuples(st.integers(1, 255), st.integers(0, 3), st.binary(max_size=300)),
                max_size=10))
def test_pdvs_round_trip(pdvs: list[tuple[int, int, bytes]]) -> None:
    body = b"".join(split(pdu.encode_pdata(c, m, d))[1] for c, m, d in pdvs)
    assert [(c, m, bytes(d)) for c, m, d in pdu.iter_pdvs(memoryview(body))] == pdvs


# ------------------------------------------------------------------ against pynetdicom's codec


def sub_items(decoded: Any) -> dict[str, Any]:
    """pynetdicom's decoded user-information sub-items, by class name."""
    return {type(item).__name__: item for item in decoded.user_information.user_data}


def test_pynetdicom_decodes_our_associate_rq() -> None:
    theirs = PynetdicomRQ()
    theirs.decode(pdu.encode_associate_rq(sample_rq()))
    assert theirs.called_ae_title == "DICOMGW"
    assert theirs.calling_ae_title == "US_ROOM3"
    assert theirs.application_context_name == pdu.APPLICATION_CONTEXT
    proposed = [(c.context_id, c.abstract_syntax, c.transfer_syntax)
                for c in theirs.presentation_context]
    assert proposed == [(1, VERIFICATION, [IMPLICIT]), (3, US, [JPEG_BASELINE, EXPLICIT, IMPLICIT]),
                        (5, CT, [EXPLICIT])]
    info = sub_items(theirs)
    assert info["MaximumLengthSubItem"].maximum_length_received == 16384
    assert info["ImplementationClassUIDSubItem"].implementation_class_uid == "1.2.826.0.1.3680043.9.1234"
    assert info["ImplementationVersionNameSubItem"].implementation_version_name == "TEST_1"
    role = info["SCP_SCU_RoleSelectionSubItem"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, True, False)


def test_we_decode_pynetdicoms_associate_rq() -> None:
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "PYNETDICOM"
    primitive.called_ae_title = "DICOMGW"
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    context = build_context(CT, [JPEG_BASELINE, IMPLICIT])
    context.context_id = 3
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.3.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PYN_300"
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role, role.scp_role = True, True
    primitive.user_information = [max_length, class_uid, version, role]
    theirs = PynetdicomRQ()
    theirs.from_primitive(primitive)

    pdu_type, body = split(theirs.encode())

    assert pdu_type == pdu.ASSOCIATE_RQ
    assert pdu.decode_associate_rq(body) == pdu.AssociateRQ(
        "DICOMGW", "PYNETDICOM", pdu.APPLICATION_CONTEXT,
        (pdu.ContextProposal(3, CT, (JPEG_BASELINE, IMPLICIT)),),
        pdu.UserInfo(32768, "1.2.3.4", "PYN_300", (pdu.RoleSelection(CT, True, True),)),
    )


def test_pynetdicom_decodes_our_associate_ac() -> None:
    ac = pdu.AssociateAC("DICOMGW", "US_ROOM3", pdu.APPLICATION_CONTEXT,
                         (pdu.ContextResult(1, 0, IMPLICIT), pdu.ContextResult(3, 4)),
                         pdu.UserInfo(262144, "1.2.3.4", "DICOMGW_010"))
    theirs = PynetdicomAC()
    theirs.decode(pdu.encode_associate_ac(ac))
    results = [(c.context_id, c.result, c.transfer_syntax) for c in theirs.presentation_context]
    assert results[0] == (1, 0, IMPLICIT)
    assert results[1][:2] == (3, 4)
    assert sub_items(theirs)["MaximumLengthSubItem"].maximum_length_received == 262144


# ---------------------------------------------------------------------------- hostile bodies


def rq_body() -> bytes:
    return split(pdu.encode_associate_rq(sample_rq()))[1]


def test_an_associate_rq_shorter_than_its_fixed_fields_raises() -> None:
    with pytest.raises(ProtocolError, match="shorter than its fixed fields"):
        pdu.decode_associate_rq(rq_body()[:67])


def test_an_associate_ac_shorter_than_its_fixed_fields_raises() -> None:
    with pytest.raises(ProtocolError):
        pdu.decode_associate_ac(b"\0\1" + bytes(20))


def test_a_truncated_item_header_raises() -> None:
    body = rq_body() + b"\x50\x00"  # two bytes of a further item header
    with pytest.raises(ProtocolError, match="truncated item"):
        pdu.decode_associate_rq(body)


def test_an_item_that_overruns_its_pdu_raises() -> None:
    body = bytearray(rq_body())
    # the application context item at offset 68: declare it longer than the whole PDU
    struct.pack_into(">H", body, 70, 0xFFFF)
    with pytest.raises(ProtocolError, match="overruns"):
        pdu.decode_associate_rq(bytes(body))


def test_an_overrunning_sub_item_of_a_presentation_context_raises() -> None:
    item = bytes((1, 0, 0, 0)) + b"\x30\x00\x00\x40" + b"1.2"  # abstract syntax declares 64 bytes
    body = rq_body()[:68] + b"\x20\x00" + struct.pack(">H", len(item)) + item
    with pytest.raises(ProtocolError, match="presentation context"):
        pdu.decode_associate_rq(body)


def test_a_presentation_context_item_too_short_for_its_id_raises() -> None:
    body = rq_body()[:68] + b"\x20\x00\x00\x02\x01\x00"
    with pytest.raises(ProtocolError, match="truncated presentation context"):
        pdu.decode_associate_rq(body)


def test_an_overrunning_user_information_sub_item_raises() -> None:
    user_info = b"\x51\x00\x00\x08" + b"\0\0\x40\0"  # max length sub-item declares 8, has 4
    body = rq_body()[:68] + b"\x50\x00" + struct.pack(">H", len(user_info)) + user_info
    with pytest.raises(ProtocolError, match="user information"):
        pdu.decode_associate_rq(body)


def test_an_associate_rj_shorter_than_four_bytes_raises() -> None:
    with pytest.raises(ProtocolError):
        pdu.decode_associate_rj(b"\0\1\1")


@pytest.mark.parametrize(
    "body",
    [
        b"\0\0\0",  # shorter than a PDV header
        struct.pack(">LBB", 1, 1, 3),  # length 1 cannot hold context id + control header
        struct.pack(">LBB", 100, 1, 3) + b"short",  # overruns the PDU
        struct.pack(">LBB", 0xFFFFFFFF, 1, 3) + b"x",  # hostile length
        struct.pack(">LBB", 3, 1, 3) + b"x" + b"\0\0",  # a good PDV, then a truncated one
    ],
)
def test_malformed_pdv_items_raise(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(pdu.iter_pdvs(memoryview(body)))


def test_unknown_items_and_sub_items_are_skipped() -> None:
    # an unknown item type (0x77) and an unknown user-information sub-item (0x5F) are ignored
    base = rq_body()
    extra = b"\x77\x00\x00\x03abc"
    user_info = b"\x51\x00\x00\x04\x00\x00\x80\x00" + b"\x5f\x00\x00\x02zz"
    body = base + extra + b"\x50\x00" + struct.pack(">H", len(user_info)) + user_info
    decoded = pdu.decode_associate_rq(body)
    assert decoded.user_info.max_pdu == 0x8000  # the later user information item wins
    assert [c.id for c in decoded.contexts] == [1, 3, 5]


def split_pdus(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(context id, control header, fragment) of every PDV in a stream of P-DATA-TF PDUs."""
    found, offset = [], 0
    while offset < len(stream):
        pdu_type, length = pdu.HEADER.unpack_from(stream, offset)
        assert pdu_type == pdu.P_DATA_TF
        body = memoryview(stream)[offset + 6 : offset + 6 + length]
        found += [(c, ctl, bytes(f)) for c, ctl, f in pdu.iter_pdvs(body)]
        offset += 6 + length
    return found


def framed(data: bytes, size: int, announced: int | None = None) -> list[bytes]:
    """The blocks ``read_pdus`` produces for a file holding ``data``."""
    blocks, last = [], False
    remaining = len(data) if announced is None else announced
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.seek(0)
        while not last:
            block, remaining, last = read_pdus(handle.fileno(), 3, size, remaining)
            blocks.append(bytes(block))
    return blocks


@settings(max_examples=60)
@given(length=st.integers(0, 3 * SEND_BLOCK), size=st.sampled_from([7, 16378, 16384, 262138]))
def test_read_pdus_frames_a_file_into_pdvs_that_reassemble_it(length: int, size: int) -> None:
    length = min(length, 600 * size)  # tiny PDVs: a short file keeps the example fast
    data = bytes(range(251)) * (length // 251) + bytes(range(length % 251))
    blocks = framed(data, size)
    pdvs = split_pdus(b"".join(blocks))

    assert b"".join(fragment for _, _, fragment in pdvs) == data
    assert [control for _, control, _ in pdvs] == [0] * (len(pdvs) - 1) + [2]
    assert all(context == 3 and len(fragment) <= size for context, _, fragment in pdvs)
    assert all(len(block) <= SEND_BLOCK + (SEND_BLOCK // size + 1) * pdu.PDATA_HEADER_BYTES
               for block in blocks)
    assert len(pdvs) == max(1, -(-length // size))  # an empty dataset is one empty last PDV


def test_read_pdus_ends_early_when_the_file_is_shorter_than_announced() -> None:
    pdvs = split_pdus(b"".join(framed(b"x" * 25, 10, announced=100)))
    assert [(control, len(fragment)) for _, control, fragment in pdvs] == [(0, 10), (0, 10), (2, 5)]


def test_read_pdus_reads_a_block_of_small_pdvs_with_one_system_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real_readv = os.readv

    def readv(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)
    data = bytes(range(256)) * 4096  # 1 MiB: four blocks of sixteen 16 KiB PDVs
    pdvs = split_pdus(b"".join(framed(data, 16384)))

    assert calls == [16, 16, 16, 16]
    assert b"".join(fragment for _, _, fragment in pdvs) == data


def test_read_pdus_puts_a_prefix_first_in_the_same_block() -> None:
    command = pdu.encode_pdata(3, 0x03, b"command set")
    with tempfile.TemporaryFile() as handle:
        handle.write(b"d" * 100)
        handle.seek(0)
        block, remaining, last = read_pdus(handle.fileno(), 3, 40, 100, prefix=command)

    assert (remaining, last) == (0, True)
    assert bytes(block[: len(command)]) == command
    pdvs = split_pdus(bytes(block))
    assert [(control, fragment) for _, control, fragment in pdvs] == [
        (3, b"command set"), (0, b"d" * 40), (0, b"d" * 40), (2, b"d" * 20)]


class RecordingChannel:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))


def test_a_message_goes_to_the_transport_in_one_write() -> None:
    channel = RecordingChannel()
    send_message(channel, 5, b"c" * 30, b"x" * 25, peer_max_pdu=16)  # type: ignore[arg-type]

    (written,) = channel.writes  # one segment with TCP_NODELAY, not one per header and fragment
    pdvs = split_pdus(written)
    assert b"".join(f for _, c, f in pdvs if c & 1) == b"c" * 30
    assert b"".join(f for _, c, f in pdvs if not c & 1) == b"x" * 25
    assert [c for _, c, _ in pdvs] == [1, 1, 3, 0, 0, 2]  # PDVs of 16 - 6 bytes
    assert written == encode_message(5, b"c" * 30, b"x" * 25, 16)
