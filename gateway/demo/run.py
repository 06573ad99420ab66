"""``dicom-gateway demo``: the gateway with a simulated Test PACS, Prod PACS and RIS on loopback."""

from __future__ import annotations

import contextlib
import signal
from datetime import date
from pathlib import Path

import anyio

from gateway.demo.samples import write_sample_images
from gateway.demo.simulators import StorageSimulator, WorklistSimulator
from gateway.demo.worklist_items import demo_worklist
from gateway.service import Gateway
from gateway.settings import Destination, Modality, Settings, Worklist

DEMO_RULES = Path(__file__).parent / "rules"
MODALITY = "US_DEMO"


def demo_settings(data_dir: Path, port: int, http_port: int) -> Settings:
    def peer(ae: str, offset: int) -> Destination:
        return Destination(ae_title=ae, host="127.0.0.1", port=port + offset)

    return Settings(
        ae_title="DICOMGW",
        host="127.0.0.1",
        port=port,
        http_port=http_port,
        spool_dir=data_dir / "spool",
        rules_dir=DEMO_RULES,
        destinations={"PACS_TEST": peer("PACS_TEST", 1), "PACS_PROD": peer("PACS_PROD", 2)},
        worklist=Worklist(ae_title="RIS", host="127.0.0.1", port=port + 3),
        modalities=[Modality(ae_title=MODALITY), Modality(ae_title="CT_DEMO")],
    )


async def run_demo(data_dir: Path, port: int, http_port: int) -> None:
    data_dir = data_dir.resolve()
    settings = demo_settings(data_dir, port, http_port)
    samples = write_sample_images(data_dir / "samples")
    with contextlib.ExitStack() as stack:
        for name in ("PACS_TEST", "PACS_PROD"):
            destination = settings.destinations[name]
            stack.enter_context(
                StorageSimulator(name, destination.port, data_dir / name.lower().replace("_", "-"))
            )
        assert settings.worklist is not None
        stack.enter_context(
            WorklistSimulator("RIS", settings.worklist.port, demo_worklist(date.today(), MODALITY))
        )
        gateway = Gateway(settings)
        async with anyio.create_task_group() as tg:
            bound = await tg.start(gateway.run)
            print(instructions(settings, bound.dicom_port, bound.http_port, data_dir, samples), flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    gateway.stop()
                    break
            tg.cancel_scope.deadline = anyio.current_time() + settings.shutdown_timeout + 5


def instructions(settings: Settings, port: int, http_port: int, data_dir: Path, samples: list[Path]) -> str:
    test, prod = settings.destinations["PACS_TEST"], settings.destinations["PACS_PROD"]
    assert settings.worklist is not None
    sample = samples[0]
    return f"""
dicom-gateway demo is running. Press Ctrl-C to stop.

  gateway     DICOMGW    127.0.0.1:{port}   metrics http://127.0.0.1:{http_port}/metrics
  Test PACS   PACS_TEST  127.0.0.1:{test.port}   stores into {data_dir / "pacs-test"}
  Prod PACS   PACS_PROD  127.0.0.1:{prod.port}   stores into {data_dir / "pacs-prod"}
  RIS (MWL)   RIS        127.0.0.1:{settings.worklist.port}
  rules       {settings.rules_dir}: {MODALITY} -> PACS_TEST only, everything else -> PACS_PROD

Try it with DCMTK (Debian package dcmtk; /usr/bin/... if pynetdicom's same-named tools shadow them):
  echoscu -aet {MODALITY} -aec DICOMGW 127.0.0.1 {port}
  findscu -W -aet {MODALITY} -aec DICOMGW -k PatientName -k PatientID -k AccessionNumber \\
      -k "ScheduledProcedureStepSequence[0].Modality=US" \\
      -k "ScheduledProcedureStepSequence[0].ScheduledStationAETitle={MODALITY}" 127.0.0.1 {port}
  storescu -aet {MODALITY} -aec DICOMGW 127.0.0.1 {port} {sample}     # lands in the Test PACS
  storescu -aet CT_DEMO -aec DICOMGW 127.0.0.1 {port} {sample}     # lands in the Prod PACS
  curl -s http://127.0.0.1:{http_port}/metrics | grep dicomgw_forward_attempts_total
"""
