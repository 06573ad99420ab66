"""Per-association budgets (time and bytes) and the security event logged for each rejection."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest
from gateway_harness import GatewayThread
from peers import make_us_image, split_part10

from gateway.dicom.fsm import Action
from gateway.dicom.pdu import ContextProposal
from gateway.dicom.requestor import RequestorAssociation, RequestorConfig
from gateway.errors import AssociationAborted, AssociationRejected, PeerTimeout
from gateway.settings import Modality, Settings

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
VERIFICATION = "1.2.840.10008.1.1"


def _settings(tmp_path: Path, **extra: object) -> Settings:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    return Settings.model_validate({"host": "127.0.0.1", "port": 0, "http_port": 0,
                                    "spool_dir": tmp_path / "spool", "rules_dir": rules, **extra})


async def _open(port: int, calling: str = "US_ROOM3") -> RequestorAssociation:
    proposals = [ContextProposal(1, VERIFICATION, (EXPLICIT_LE,)),
                 ContextProposal(3, US_IMAGE, (EXPLICIT_LE,))]
    return await RequestorAssociation.open("127.0.0.1", port, "DICOMGW", proposals,
                                           RequestorConfig(calling))


def test_time_budget_aborts_a_lingering_association(tmp_path: Path) -> None:
    with GatewayThread(_settings(tmp_path, max_association_seconds=0.5,
                                 network_timeout=30.0)) as gw:
        async def linger() -> Action:
            association = await _open(gw.port)
            try:
                _, _, action = await association.channel.read_pdu(10.0)  # we send nothing
                return action
            finally:
                association.channel.close()

        assert anyio.run(linger) is Action.ABORT_INDICATION


def test_size_budget_aborts_and_keeps_nothing_partial(tmp_path: Path) -> None:
    images = [tmp_path / f"us{i}.dcm" for i in range(3)]
    for seed, image in enumerate(images):
        make_us_image(image, seed, rows=100, cols=100)  # ~30 KB of pixels each
    with GatewayThread(_settings(tmp_path, max_association_bytes=70_000)) as gw:
        async def send_all() -> list[int]:
            association = await _open(gw.port)
            statuses: list[int] = []
            context = association.context_for(US_IMAGE, [EXPLICIT_LE])
            assert context is not None
            try:
                for image in images:
                    sop = f"1.2.826.0.1.3680043.8.498.99.{len(statuses) + 1}"
                    response = await association.store_file(context, US_IMAGE, sop, image,
                                                            split_part10(image.read_bytes())[1])
                    statuses.append(response.status or 0)
            except (AssociationAborted, PeerTimeout, ConnectionError):
                pass
            finally:
                association.channel.close()
            return statuses

        statuses = anyio.run(send_all)
    assert statuses == [0, 0]  # the third store would cross 70,000 bytes: aborted, not acknowledged
    assert len(list((tmp_path / "spool" / "objects").rglob("*.dcm"))) == 2
    assert not list((tmp_path / "spool" / "tmp").iterdir())


def test_rejections_are_logged_as_security_events(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.scp")
    with GatewayThread(_settings(tmp_path, modalities=[Modality(ae_title="US_ROOM3",
                                                                addresses=["127.0.0.1"])])) as gw:
        async def rejected(calling: str) -> tuple[int, int, int]:
            with pytest.raises(AssociationRejected) as caught:
                await _open(gw.port, calling)
            return caught.value.result, caught.value.source, caught.value.reason

        async def accepted() -> None:
            association = await _open(gw.port)
            await association.release()

        assert anyio.run(rejected, "CT_ROOM1") == (1, 1, 3)
        anyio.run(accepted)  # the known modality from its address is accepted
    events = [r for r in caplog.records if getattr(r, "event", None) == "association_rejected"]
    assert len(events) == 1
    event = events[0]
    assert (event.calling_ae, event.source_ip, event.reason) == (  # type: ignore[attr-defined]
        "CT_ROOM1", "127.0.0.1", "calling_ae")
    assert "add it under 'modalities'" in event.getMessage()


def test_known_modality_from_the_wrong_address_is_rejected_and_counted(tmp_path: Path) -> None:
    modalities = [Modality(ae_title="US_ROOM3", addresses=["10.20.0.0/16"])]  # we call from 127.0.0.1
    with GatewayThread(_settings(tmp_path, modalities=modalities)) as gw:
        async def rejected() -> tuple[int, int, int]:
            with pytest.raises(AssociationRejected) as caught:
                await _open(gw.port, "US_ROOM3")
            return caught.value.result, caught.value.source, caught.value.reason

        assert anyio.run(rejected) == (1, 1, 3)
        assert gw.gateway is not None
        registry = gw.gateway.registry
        assert registry.get_sample_value("dicomgw_association_rejects_total",
                                         {"reason": "source_ip"}) == 1
        assert registry.get_sample_value("dicomgw_association_rejects_total",
                                         {"reason": "calling_ae"}) == 0


def test_same_sop_instance_twice_is_stored_twice_and_counted(tmp_path: Path) -> None:
    image = tmp_path / "us.dcm"
    make_us_image(image, 3, rows=16, cols=16)
    sop = "1.2.826.0.1.3680043.8.498.99.42"
    with GatewayThread(_settings(tmp_path)) as gw:  # default policy: accept and forward again
        async def twice() -> list[int]:
            association = await _open(gw.port)
            context = association.context_for(US_IMAGE, [EXPLICIT_LE])
            assert context is not None
            statuses = []
            for _ in range(2):
                response = await association.store_file(context, US_IMAGE, sop, image,
                                                        split_part10(image.read_bytes())[1])
                statuses.append(response.status or 0)
            await association.release()
            return statuses

        assert anyio.run(twice) == [0, 0]
        assert gw.gateway is not None
        assert gw.gateway.registry.get_sample_value("dicomgw_duplicates_total") == 1
    assert len(list((tmp_path / "spool" / "objects").rglob("*.dcm"))) == 2
