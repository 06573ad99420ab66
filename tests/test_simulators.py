"""The demo simulators: a storage SCP and a worklist SCP, exercised by DCMTK and pynetdicom."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pynetdicom
import pytest
from peers import (
    make_us_image,
    mwl_query_keys,
    read_findscu_results,
    run_dcmsend,
    run_echoscu,
    run_findscu_worklist,
    run_storescu,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE

from gateway.demo.simulators import (
    MODALITY_WORKLIST_FIND,
    VERIFICATION,
    StorageSimulator,
    WorklistSimulator,
    answer,
    matches,
)
from gateway.demo.worklist_items import demo_worklist

TODAY = date(2024, 3, 5)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[StorageSimulator]:
    with StorageSimulator("PACS_SIM", 0, tmp_path / "pacs") as simulator:
        yield simulator


def _scu(*contexts: str) -> AE:
    ae = AE(ae_title="TEST_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return ae


# ---------------------------------------------------------------------------------------------
# StorageSimulator


@pytest.mark.peer
def test_storescu_into_storage_simulator_writes_files_named_by_us(
    storage: StorageSimulator, tmp_path: Path
) -> None:
    images = [make_us_image(tmp_path / f"in/{i}.dcm", seed=i, rows=64, cols=64) for i in range(3)]

    result = run_storescu(storage.port, sorted((tmp_path / "in").iterdir()), called_ae="PACS_SIM")

    assert result.returncode == 0, result.stdout + result.stderr
    assert storage.count == 3
    files = storage.files()
    assert len(files) == 3
    stored = {dcmread(path).SOPInstanceUID for path in files}
    assert stored == {image.SOPInstanceUID for image in images}
    assert not any(image.SOPInstanceUID in path.name for path in files for image in images)
    assert [p.name for p in storage.folder.iterdir() if not p.name.endswith(".dcm")] == []


@pytest.mark.peer
def test_jpeg_baseline_is_accepted_and_stored_as_is(
    storage: StorageSimulator, sample_files: dict[str, Path]
) -> None:
    original = sample_files["jpeg_baseline"]

    result = run_storescu(storage.port, [original], called_ae="PACS_SIM", extra_args=["-xy"])

    assert result.returncode == 0, result.stdout + result.stderr
    [stored] = storage.files()
    received = dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert received.PixelData == dcmread(original).PixelData


@pytest.mark.peer
def test_every_compressed_sample_keeps_its_transfer_syntax(
    storage: StorageSimulator, sample_files: dict[str, Path]
) -> None:
    result = run_dcmsend(storage.port, sample_files.values(), called_ae="PACS_SIM")

    assert result.returncode == 0, result.stdout + result.stderr
    assert storage.wait_for(len(sample_files), timeout=10)
    received = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in storage.files()}
    for category, path in sample_files.items():
        syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if syntax.is_compressed:
            assert str(syntax) in received, category


@pytest.mark.peer
def test_failure_status_stores_nothing_and_a_warning_stores(tmp_path: Path) -> None:
    make_us_image(tmp_path / "us.dcm", seed=1, rows=16, cols=16)
    with (
        StorageSimulator("FULL", 0, tmp_path / "full", status=0xA700) as full,
        StorageSimulator("WARN", 0, tmp_path / "warn", status=0xB000) as warn,
    ):
        failed = run_storescu(full.port, [tmp_path / "us.dcm"], called_ae="FULL", extra_args=["-v"])
        warned = run_storescu(warn.port, [tmp_path / "us.dcm"], called_ae="WARN", extra_args=["-v"])

    assert failed.returncode != 0
    assert "Refused: OutOfResources" in failed.stderr
    assert (full.count, full.files()) == (0, [])
    assert warned.returncode == 0, warned.stderr
    assert "Warning" in warned.stderr
    assert warn.count == len(warn.files()) == 1


@pytest.mark.peer
def test_wrong_called_ae_title_is_rejected(storage: StorageSimulator) -> None:
    assert run_echoscu(storage.port, called_ae="PACS_SIM").returncode == 0
    result = run_echoscu(storage.port, called_ae="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()


def test_wait_for_times_out_when_nothing_arrives(storage: StorageSimulator) -> None:
    assert storage.wait_for(0, timeout=0.01)
    assert not storage.wait_for(1, timeout=0.05)


def test_accepted_sockets_have_nagle_disabled(storage: StorageSimulator) -> None:
    assoc = _scu(VERIFICATION).associate("127.0.0.1", storage.port, ae_title="PACS_SIM")
    try:
        assert assoc.is_established
        assert storage.server is not None
        [server_side] = storage.server.active_associations
        sock = server_side.dul.socket
        assert sock is not None and sock.socket is not None
        assert sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_simulators_leave_pynetdicom_config_alone(tmp_path: Path) -> None:
    before = {k: v for k, v in vars(pynetdicom._config).items() if not k.startswith("__")}
    with (
        StorageSimulator("A", 0, tmp_path / "a") as storage,
        WorklistSimulator("B", 0, demo_worklist(TODAY, n=1)) as worklist,
    ):
        assert storage.port != 0
        assert worklist.port != 0
    after = {k: v for k, v in vars(pynetdicom._config).items() if not k.startswith("__")}
    assert after == before


def test_stop_closes_the_port_and_aborts_open_associations(tmp_path: Path) -> None:
    simulator = StorageSimulator("A", 0, tmp_path / "a")
    simulator.start()
    port = simulator.port
    assoc = _scu(VERIFICATION).associate("127.0.0.1", port, ae_title="A")
    assert assoc.is_established

    simulator.stop()

    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assoc.join(timeout=5)  # the requestor's thread ends when the A-ABORT arrives
    assert not assoc.is_alive()
    assert assoc.is_aborted


def test_a_restarted_simulator_listens_on_the_same_port(tmp_path: Path) -> None:
    simulator = StorageSimulator("A", 0, tmp_path / "a")
    with simulator:
        port = simulator.port
    with simulator:
        assert simulator.port == port
        assoc = _scu(VERIFICATION).associate("127.0.0.1", port, ae_title="A")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


# ---------------------------------------------------------------------------------------------
# WorklistSimulator


@pytest.mark.peer
def test_findscu_answers_carry_the_demo_items(tmp_path: Path) -> None:
    items = demo_worklist(TODAY, station_ae="US_ROOM1", n=5) + demo_worklist(TODAY, "US_ROOM2", n=2, seed=9)
    with WorklistSimulator("RIS_SIM", 0, items) as ris:
        keys = mwl_query_keys(station_ae="US_ROOM1", modality="US", start_date="20240301-20240331")
        result = run_findscu_worklist(ris.port, called_ae="RIS_SIM", keys=keys, out_dir=tmp_path / "out")

    assert result.returncode == 0, result.stdout + result.stderr
    answers = read_findscu_results(tmp_path / "out")
    assert [str(a.PatientName) for a in answers] == [str(i.PatientName) for i in items[:5]]
    first = answers[0]
    assert first.SpecificCharacterSet == "ISO_IR 192"
    assert first.AccessionNumber == items[0].AccessionNumber
    step = first.ScheduledProcedureStepSequence[0]
    assert step.ScheduledStationAETitle == "US_ROOM1"
    assert (
        step.ScheduledProcedureStepID == items[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    )
    assert "ScheduledProtocolCodeSequence" not in step  # not asked for


def test_c_cancel_mid_stream_ends_with_fe00() -> None:
    items = demo_worklist(TODAY, n=1) * 3000
    query = Dataset()
    query.PatientName = ""
    query.ScheduledProcedureStepSequence = Sequence([Dataset()])
    query.ScheduledProcedureStepSequence[0].Modality = "US"
    with WorklistSimulator("RIS_SIM", 0, items) as ris:
        assoc = _scu(MODALITY_WORKLIST_FIND).associate("127.0.0.1", ris.port, ae_title="RIS_SIM")
        assert assoc.is_established
        pending, final = 0, None
        try:
            for status, _identifier in assoc.send_c_find(query, MODALITY_WORKLIST_FIND, msg_id=7):
                if status.Status == 0xFF00:
                    pending += 1
                    if pending == 1:
                        assoc.send_c_cancel(7, query_model=MODALITY_WORKLIST_FIND)
                else:
                    final = status.Status
        finally:
            assoc.release()

    assert final == 0xFE00
    assert 1 <= pending < len(items)


# ---------------------------------------------------------------------------------------------
# Matching (pure)


def _item(name: str = "DEMO^ALICE", station: str = "US1", day: str = "20240305") -> Dataset:
    step = Dataset()
    step.Modality = "US"
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = day
    step.ScheduledProcedureStepStartTime = "093000"
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 192"
    item.PatientName = name
    item.PatientID = "DEMO-1"
    item.ScheduledProcedureStepSequence = Sequence([step])
    return item


def _query(**step_keys: str) -> Dataset:
    step = Dataset()
    for keyword, value in step_keys.items():
        setattr(step, keyword, value)
    query = Dataset()
    query.PatientName = ""
    query.ScheduledProcedureStepSequence = Sequence([step])
    return query


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, True),
        ({"Modality": ""}, True),
        ({"Modality": "US"}, True),
        ({"Modality": "CT"}, False),
        ({"ScheduledStationAETitle": "US1"}, True),
        ({"ScheduledStationAETitle": "US2"}, False),
        ({"ScheduledProcedureStepStartDate": "20240305"}, True),
        ({"ScheduledProcedureStepStartDate": "20240306"}, False),
        ({"ScheduledProcedureStepStartDate": "20240301-20240331"}, True),
        ({"ScheduledProcedureStepStartDate": "20240306-"}, False),
        ({"ScheduledProcedureStepStartDate": "-20240305"}, True),
        ({"ScheduledProcedureStepStartTime": "090000-100000"}, True),
        ({"Modality": "US", "ScheduledStationAETitle": "US2"}, False),
    ],
)
def test_scheduled_step_matching(keys: dict[str, str], expected: bool) -> None:
    assert matches(_query(**keys), _item()) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("", True), ("DEMO^ALICE", True), ("demo^alice", True), ("DEMO^*", True), ("DEMO^AL?CE", True),
     ("*BOB*", False), ("DEMO", False), ("DEMO^ALICE^X", False)],
)  # fmt: skip
def test_patient_name_matching_with_wildcards(pattern: str, expected: bool) -> None:
    query = _query()
    query.PatientName = pattern
    assert matches(query, _item()) is expected


def test_a_key_the_item_lacks_matches_only_when_empty() -> None:
    query = _query()
    query.AccessionNumber = ""
    assert matches(query, _item())
    query.AccessionNumber = "A1"
    assert not matches(query, _item())


def test_a_sequence_key_matches_any_of_the_items_steps() -> None:
    item = _item()
    other = Dataset()
    other.Modality = "MR"
    other.ScheduledStationAETitle = "MR1"
    item.ScheduledProcedureStepSequence.append(other)
    assert matches(_query(Modality="MR"), item)
    assert not matches(_query(Modality="MR", ScheduledStationAETitle="US1"), item)


def test_answer_keeps_only_requested_keys_and_returns_absent_ones_empty() -> None:
    query = _query(Modality="", ScheduledProcedureStepStartTime="")
    query.AccessionNumber = ""

    result = answer(query, _item())

    assert result.SpecificCharacterSet == "ISO_IR 192"
    assert str(result.PatientName) == "DEMO^ALICE"
    assert "PatientID" not in result
    assert "AccessionNumber" in result
    assert result.AccessionNumber in ("", None)
    [step] = result.ScheduledProcedureStepSequence
    assert step.Modality == "US"
    assert step.ScheduledProcedureStepStartTime == "093000"
    assert "ScheduledStationAETitle" not in step


def test_an_empty_sequence_key_returns_the_whole_sequence() -> None:
    query = Dataset()
    query.ScheduledProcedureStepSequence = Sequence()
    result = answer(query, _item())
    [step] = result.ScheduledProcedureStepSequence
    assert step.ScheduledStationAETitle == "US1"
    assert step.ScheduledProcedureStepStartDate == "20240305"


# ---------------------------------------------------------------------------------------------
# demo_worklist


def test_demo_worklist_is_deterministic_per_seed() -> None:
    assert demo_worklist(TODAY, seed=1) == demo_worklist(TODAY, seed=1)
    assert demo_worklist(TODAY, seed=1) != demo_worklist(TODAY, seed=2)


def test_demo_worklist_items_are_complete_us_procedures_for_today() -> None:
    items = demo_worklist(TODAY, station_ae="US_ROOM3", n=12)
    assert len(items) == 12
    assert len({str(i.PatientName) for i in items}) == 12
    assert len({i.AccessionNumber for i in items}) == 12
    assert len({i.StudyInstanceUID for i in items}) == 12
    for item in items:
        assert item.SpecificCharacterSet == "ISO_IR 192"
        assert str(item.PatientName).startswith("DEMO")
        assert item.PatientBirthDate and item.PatientSex in {"F", "M", "O"}
        assert item.RequestedProcedureID and item.RequestedProcedureDescription
        assert item.ReferencedStudySequence == Sequence()
        [code] = item.RequestedProcedureCodeSequence
        assert code.CodeValue and code.CodingSchemeDesignator and code.CodeMeaning
        [step] = item.ScheduledProcedureStepSequence
        assert step.Modality == "US"
        assert step.ScheduledStationAETitle == "US_ROOM3"
        assert step.ScheduledProcedureStepStartDate == "20240305"
        assert len(step.ScheduledProcedureStepStartTime) == 6
        assert step.ScheduledPerformingPhysicianName
        assert step.ScheduledProcedureStepDescription and step.ScheduledProcedureStepID
        assert len(step.ScheduledProtocolCodeSequence) == 1
