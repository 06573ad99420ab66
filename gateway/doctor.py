"""``dicom-gateway doctor``: C-ECHO every destination and check every RIS (``worklist`` and each
one in ``worklist_by_calling_ae``), in plain words."""

from __future__ import annotations

from gateway.mwl import check_worklist
from gateway.scu import echo_peer
from gateway.settings import Settings


async def run_doctor(settings: Settings) -> int:
    failures = 0
    if not settings.destinations and settings.worklist is None and not settings.worklist_by_calling_ae:
        print("no destinations and no worklist configured: nothing to check")
        return 1
    for name, destination in settings.destinations.items():
        result = await echo_peer(name, destination, settings.ae_title)
        print(("OK    " if result.ok else "FAIL  ") + result.message)
        failures += not result.ok
    if settings.worklist is not None:
        ok, message = await check_worklist(settings.worklist, settings.ae_title)
        print(("OK    " if ok else "FAIL  ") + message)
        failures += not ok
    for calling_ae, upstream in settings.worklist_by_calling_ae.items():
        ok, message = await check_worklist(upstream, settings.ae_title,
                                           f"worklist_by_calling_ae.{calling_ae}")
        print(("OK    " if ok else "FAIL  ") + f"for calling AE {calling_ae}: {message}")
        failures += not ok
    return 1 if failures else 0
