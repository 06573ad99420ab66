"""The real-peer harness works: each peer starts, answers, and exchanges data with DCMTK tools."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path

import peers
import pytest
from peers import (
    SAMPLE_FILES,
    Orthanc,
    PeerError,
    Peers,
    StoreSCP,
    WorklistSCP,
    make_us_image,
    mwl_query_keys,
    read_findscu_results,
    require_tool,
    run_dcmsend,
    run_echoscu,
    run_findscu_worklist,
    run_storescu,
    wait_until,
)
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage

from gateway.demo.worklist_items import demo_worklist

TODAY = date(2024, 3, 5)


def test_sample_files_have_the_transfer_syntax_of_their_category(sample_files: dict[str, Path]) -> None:
    assert set(sample_files) == set(SAMPLE_FILES)
    for category, path in sample_files.items():
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == SAMPLE_FILES[category].transfer_syntax, category


def test_make_us_image_writes_a_valid_part10_ultrasound_image(tmp_path: Path) -> None:
    first = make_us_image(tmp_path / "a.dcm", seed=1, rows=48, cols=64)
    second = make_us_image(tmp_path / "b.dcm", seed=1, rows=48, cols=64)
    read = dcmread(tmp_path / "a.dcm")
    assert read.preamble is not None
    assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read.SOPClassUID == UltrasoundImageStorage
    assert read.file_meta.MediaStorageSOPInstanceUID == read.SOPInstanceUID == first.SOPInstanceUID
    assert str(read.PatientName) == "TEST^PATIENT"
    assert read.PatientID == "TEST0001"
    assert read.pixel_array.shape == (48, 64, 3)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID != second.StudyInstanceUID
    assert first.PixelData == second.PixelData  # same seed, same pixels


@pytest.mark.peer
def test_storescp_answers_echo_and_stores_a_us_image(
    store_scp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = store_scp(ae_title="PACS_A")
    assert run_echoscu(scp.port, called_ae="PACS_A").returncode == 0
    image = make_us_image(tmp_path / "us.dcm", seed=7)

    result = run_storescu(scp.port, [tmp_path / "us.dcm"], called_ae="PACS_A")

    assert result.returncode == 0, result.stderr
    files = scp.received_files()
    assert len(files) == 1
    stored = dcmread(files[0])
    assert stored.SOPInstanceUID == image.SOPInstanceUID
    assert stored.PixelData == image.PixelData


@pytest.mark.peer
def test_storescp_accepts_every_sample_compressed_ones_as_is(
    store_scp: Callable[..., StoreSCP], sample_files: dict[str, Path]
) -> None:
    scp = store_scp(unique_filenames=True)

    result = run_dcmsend(scp.port, sample_files.values(), called_ae=scp.ae_title)

    assert result.returncode == 0, result.stdout + result.stderr
    files = scp.received_files()
    assert len(files) == len(sample_files)
    received = {str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) for path in files}
    # uncompressed data may be renegotiated (storescp prefers explicit VR LE); compressed may not
    compressed = {str(s.transfer_syntax) for s in SAMPLE_FILES.values() if s.transfer_syntax.is_compressed}
    assert len(compressed) == 6
    assert compressed <= received


@pytest.mark.peer
def test_refusing_storescp_rejects_the_association(
    store_scp: Callable[..., StoreSCP], tmp_path: Path
) -> None:
    scp = store_scp(refuse=True)
    make_us_image(tmp_path / "us.dcm", seed=1, rows=16, cols=16)

    result = run_storescu(scp.port, [tmp_path / "us.dcm"], called_ae=scp.ae_title)

    assert result.returncode != 0
    assert "reject" in (result.stdout + result.stderr).lower()
    assert scp.received_files() == []


@pytest.mark.peer
def test_aborting_storescp_stores_nothing(store_scp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    scp = store_scp(abort_during=True)
    make_us_image(tmp_path / "us.dcm", seed=1, rows=16, cols=16)

    result = run_storescu(scp.port, [tmp_path / "us.dcm"], called_ae=scp.ae_title)

    assert result.returncode != 0
    assert scp.received_files() == []


@pytest.mark.peer
def test_wlmscpfs_answers_echo_and_returns_the_items_written(
    worklist_scp: Callable[..., WorklistSCP], tmp_path: Path
) -> None:
    items = demo_worklist(TODAY, station_ae="US_ROOM1", n=4)
    scp = worklist_scp(items, ae_title="RIS")
    assert run_echoscu(scp.port, called_ae="RIS").returncode == 0

    out = tmp_path / "answers"
    result = run_findscu_worklist(scp.port, called_ae="RIS", out_dir=out)

    assert result.returncode == 0, result.stdout + result.stderr
    answers = read_findscu_results(out)
    assert sorted(str(a.PatientName) for a in answers) == sorted(str(i.PatientName) for i in items)
    step = answers[0].ScheduledProcedureStepSequence[0]
    assert step.Modality == "US"
    assert step.ScheduledStationAETitle == "US_ROOM1"


@pytest.mark.peer
def test_wlmscpfs_matches_on_patient_name(worklist_scp: Callable[..., WorklistSCP], tmp_path: Path) -> None:
    items = demo_worklist(TODAY, n=4)
    wanted = str(items[2].PatientName)
    scp = worklist_scp(items)
    out = tmp_path / "answers"

    keys = mwl_query_keys(patient_name=wanted)
    result = run_findscu_worklist(scp.port, called_ae=scp.ae_title, keys=keys, out_dir=out)

    assert result.returncode == 0, result.stdout + result.stderr
    assert [str(a.PatientName) for a in read_findscu_results(out)] == [wanted]


@pytest.mark.peer
def test_orthanc_answers_rest_and_dicom_and_stores(orthanc: Callable[..., Orthanc], tmp_path: Path) -> None:
    server = orthanc(ae_title="ORTHANC_T")
    assert server.system()["DicomAet"] == "ORTHANC_T"
    assert run_echoscu(server.port, called_ae="ORTHANC_T").returncode == 0
    image = make_us_image(tmp_path / "us.dcm", seed=3, rows=32, cols=32)

    result = run_storescu(server.port, [tmp_path / "us.dcm"], called_ae="ORTHANC_T")

    assert result.returncode == 0, result.stderr
    [instance] = server.instances()
    assert server.instance_tags(instance)["SOPInstanceUID"] == image.SOPInstanceUID
    assert server.instance_transfer_syntax(instance) == ExplicitVRLittleEndian


@pytest.mark.peer
def test_orthanc_sends_to_a_configured_modality(peers: Peers, tmp_path: Path) -> None:
    scp = peers.store_scp(ae_title="DEST")
    server = peers.orthanc(modalities={"dest": ("DEST", "127.0.0.1", scp.port)})
    image = make_us_image(tmp_path / "us.dcm", seed=4, rows=32, cols=32)
    instance = server.upload(tmp_path / "us.dcm")

    assert server.echo("dest")
    server.send_to_modality("dest", [instance])

    [received] = scp.received_files()
    assert dcmread(received).SOPInstanceUID == image.SOPInstanceUID


@pytest.mark.peer
def test_orthanc_worklist_plugin_serves_the_items(orthanc: Callable[..., Orthanc], tmp_path: Path) -> None:
    items = demo_worklist(TODAY, n=3)
    server = orthanc(worklist_items=items)
    out = tmp_path / "answers"

    result = run_findscu_worklist(server.port, called_ae=server.ae_title, out_dir=out)

    assert result.returncode == 0, result.stdout + result.stderr
    names = sorted(str(a.PatientName) for a in read_findscu_results(out))
    assert names == sorted(str(i.PatientName) for i in items)


@pytest.mark.peer
def test_stopped_peer_no_longer_listens(peers: Peers) -> None:
    scp = peers.store_scp()
    assert run_echoscu(scp.port, called_ae=scp.ae_title).returncode == 0
    scp.stop()
    assert scp.process is not None and scp.process.exit_code() is not None
    assert run_echoscu(scp.port, called_ae=scp.ae_title, timeout=10).returncode != 0


def test_require_tool_finds_system_binaries_only() -> None:
    assert require_tool("sh") in {"/usr/bin/sh", "/bin/sh"}


@pytest.mark.parametrize(("ci", "expected"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str, expected: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(peers, "SYSTEM_DIRS", (str(tmp_path),))
    with pytest.raises(expected, match="storescp missing: install Debian package dcmtk"):
        require_tool("storescp")


@pytest.mark.parametrize(
    ("ci", "marked", "outcome"),
    [
        ("true", True, "failed"),
        ("true", False, "skipped"),
        ("", True, "skipped"),
    ],
)
def test_peer_tests_may_not_skip_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, marked: bool, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    report = pytest.TestReport("t::x", ("t", 1, "x"), {}, "skipped", ("t", 1, "Skipped: no dcmtk"), "setup")

    peers.fail_skipped_peer_test(report, marked_peer=marked)

    assert report.outcome == outcome


@pytest.mark.peer
def test_a_peer_that_exits_at_start_fails_fast_with_its_log(peers: Peers) -> None:
    with pytest.raises(PeerError, match="exited with code") as info:
        peers.store_scp(extra_args=["--no-such-option"])
    assert "no-such-option" in str(info.value)


def test_waiting_is_bounded() -> None:
    with pytest.raises(PeerError, match="not ready after"):
        wait_until(lambda: False, what="nothing", timeout=0.05)
