"""End to end: modalities -> gateway -> real PACS (DCMTK storescp, Orthanc), routed by rules.

Deliveries are awaited through the forwarders' attempt observer (``GatewayThread.wait_for``), never by
sleeping. DCMTK re-encodes a dataset when it sends a file (group lengths, padding), so the compressed
samples are first passed once through a direct DCMTK hop: DCMTK sends its own output unchanged, so
those files are the "original" the gateway must deliver byte for byte.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GATEWAY_AE, GatewayThread, destination_config, gateway_config
from peers import (
    Peers,
    free_port,
    make_us_images,
    run_dcmsend,
    run_storescu,
    sop_instance_uids,
    split_part10,
)
from pydicom import dcmread

from gateway.dicom.negotiation import UNCOMPRESSED
from gateway.settings import Settings, load_settings

HOST = "127.0.0.1"
WAIT = 60.0

ROOM3_RULES = """
rules:
  - name: us-room3
    match: {calling_ae: US_ROOM3}
    destinations: [PACS_TEST]
    stop: true
  - name: rest
    destinations: [PACS_PROD]
"""

BOTH_RULES = """
rules:
  - name: everything-everywhere
    destinations: [PACS_TEST, PACS_PROD]
"""

PROD_RULES = """
rules:
  - name: everything-to-prod
    destinations: [PACS_PROD]
"""


def gateway_settings(
    tmp_path: Path, destinations: dict[str, dict[str, Any]], rules: str, **extra: Any
) -> Settings:
    return load_settings(gateway_config(tmp_path, destinations, rules, **extra))




def fingerprint(path: Path) -> tuple[str, str, str]:
    """(SOP Instance UID, transfer syntax, SHA-256 of the dataset bytes)."""
    data = path.read_bytes()
    meta, offset = split_part10(data)
    dataset = data[offset:]
    uid, syntax = (meta[e].rstrip(b"\0 ").decode() for e in (0x0003, 0x0010))
    return uid, syntax, hashlib.sha256(dataset).hexdigest()


def fingerprints(paths: Iterable[Path]) -> collections.Counter[tuple[str, str, str]]:
    return collections.Counter(fingerprint(p) for p in paths)




@pytest.mark.peer
def test_routes_by_calling_ae_and_every_dataset_arrives_byte_identical(
    tmp_path: Path, peers: Peers, sample_files: dict[str, Path]
) -> None:
    test_pacs = peers.store_scp(ae_title="TESTPACS", extra_args=["+B"], unique_filenames=True)
    prod_pacs = peers.store_scp(ae_title="PRODPACS", extra_args=["+B"], unique_filenames=True)
    reference = peers.store_scp(ae_title="REFERENCE", extra_args=["+B"], unique_filenames=True)
    hop = run_dcmsend(reference.port, sample_files.values(), called_ae="REFERENCE")
    assert hop.returncode == 0, hop.stderr
    samples = reference.received_files()
    room3 = make_us_images(tmp_path / "room3", 3, first_seed=1, rows=48, cols=64)
    others = make_us_images(tmp_path / "others", 2, first_seed=100, rows=48, cols=64)
    settings = gateway_settings(
        tmp_path,
        {
            "PACS_TEST": destination_config(test_pacs.port, "TESTPACS"),
            "PACS_PROD": destination_config(prod_pacs.port, "PRODPACS"),
        },
        ROOM3_RULES,
    )

    with GatewayThread(settings) as gw:
        sent = [
            run_storescu(gw.port, room3, calling_ae="US_ROOM3", called_ae=GATEWAY_AE),
            run_storescu(gw.port, others, calling_ae="CT_ROOM1", called_ae=GATEWAY_AE),
            run_dcmsend(gw.port, samples, calling_ae="MR_ROOM2", called_ae=GATEWAY_AE),
        ]
        assert [r.returncode for r in sent] == [0, 0, 0], [r.stderr for r in sent]
        expected_prod = len(others) + len(samples)
        gw.wait_for(
            lambda g: g.delivered("PACS_TEST") >= len(room3) and g.delivered("PACS_PROD") >= expected_prod,
            WAIT,
        )

    assert dict(gw.attempts) == {
        ("PACS_TEST", "delivered"): len(room3),
        ("PACS_PROD", "delivered"): expected_prod,
    }
    assert fingerprints(test_pacs.received_files()) == fingerprints(room3)
    assert fingerprints(prod_pacs.received_files()) == fingerprints([*others, *samples])
    compressed = {syntax for _, syntax, _ in fingerprints(prod_pacs.received_files())} - set(UNCOMPRESSED)
    assert len(compressed) >= 6, f"too few compressed syntaxes went through: {compressed}"


@pytest.mark.peer
def test_orthanc_as_prod_pacs_holds_every_instance_in_its_own_transfer_syntax(
    tmp_path: Path, peers: Peers, sample_files: dict[str, Path]
) -> None:
    orthanc = peers.orthanc(ae_title="ORTHANC")
    categories = [
        "explicit_le",
        "deflate",
        "jpeg_baseline",
        "jpeg_lossless",
        "jpeg_ls",
        "jpeg2000_lossless",
        "jpeg2000",
    ]
    files = [sample_files[c] for c in categories]
    files += make_us_images(tmp_path / "us", 2, first_seed=7, rows=48, cols=64)
    expected = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        expected[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    assert len(expected) == len(files), "the chosen samples must have distinct SOP Instance UIDs"
    prod = destination_config(orthanc.port, "ORTHANC")
    settings = gateway_settings(tmp_path, {"PACS_PROD": prod}, PROD_RULES)

    with GatewayThread(settings) as gw:
        result = run_dcmsend(gw.port, files, calling_ae="CT_ROOM1", called_ae=GATEWAY_AE)
        assert result.returncode == 0, result.stderr
        gw.wait_for(lambda g: g.delivered("PACS_PROD") >= len(files), WAIT)

    instances = orthanc.instances()
    stored = {
        orthanc.instance_tags(i)["SOPInstanceUID"]: orthanc.instance_transfer_syntax(i) for i in instances
    }
    assert len(instances) == len(files)
    assert stored == expected
    assert dict(gw.attempts) == {("PACS_PROD", "delivered"): len(files)}


@pytest.mark.peer
def test_a_destination_that_is_down_loses_nothing_and_does_not_delay_the_other(
    tmp_path: Path, peers: Peers
) -> None:
    test_pacs = peers.store_scp(ae_title="TESTPACS")
    prod_port = free_port()  # nothing listens here until the PACS "comes up"
    images = make_us_images(tmp_path / "us", 5, first_seed=20, rows=48, cols=64)
    settings = gateway_settings(
        tmp_path,
        {
            "PACS_TEST": destination_config(test_pacs.port, "TESTPACS"),
            "PACS_PROD": destination_config(prod_port, "PRODPACS"),
        },
        BOTH_RULES,
    )

    with GatewayThread(settings) as gw:
        result = run_storescu(gw.port, images, calling_ae="US_ROOM1", called_ae=GATEWAY_AE)
        assert result.returncode == 0, result.stderr  # acknowledged while PACS_PROD is down
        gw.wait_for(
            lambda g: g.delivered("PACS_TEST") >= len(images) and g.attempts[("PACS_PROD", "transient")] >= 2,
            WAIT,
        )
        # the observer saw every PACS_TEST delivery while PACS_PROD still had none
        assert gw.delivered("PACS_TEST") == len(images)
        assert gw.delivered("PACS_PROD") == 0
        assert gw.gateway is not None
        spool = gw.gateway.spool
        waiting = gw.call(
            lambda: spool.list_items(destination="PACS_PROD", dead=False, held=False, limit=100)
        )
        assert len(waiting) == len(images)
        errors = {item.last_error for item in waiting if item.attempts}
        assert errors == {
            f"PACS_PROD: nothing listens at {HOST}:{prod_port}: check that the PACS is "
            "running and the port is right (destinations.PACS_PROD.port)"
        }

        # --fork: the gateway connects as soon as the port opens; the readiness C-ECHO must not
        # wait behind its association
        prod_pacs = peers.store_scp(ae_title="PRODPACS", port=prod_port, fork=True)
        gw.wait_for(lambda g: g.delivered("PACS_PROD") >= len(images), WAIT)

    assert gw.delivered("PACS_TEST") == len(images), "nothing was sent twice to PACS_TEST"
    assert not gw.dead
    assert gw.attempts[("PACS_PROD", "permanent")] == 0
    sent = sop_instance_uids(images)
    assert sop_instance_uids(test_pacs.received_files()) == sent
    assert sop_instance_uids(prod_pacs.received_files()) == sent
