"""kill -9 while forwarding: after a restart every acknowledged image reaches every routed PACS.

The gateway runs as ``dicom-gateway serve`` (a subprocess, ready on sd_notify READY=1). 500 small
images are acknowledged while both PACS are down, the PACS come up, and the gateway is killed with
SIGKILL at a seeded random point after some deliveries. After the restart the PACS must hold every
SOP Instance UID that was sent (duplicates are allowed: delivery is at least once).

The kill point is observed with inotify on PACS_TEST's folder (``bench.measure.Landing``), the
restart's progress with ``peers.wait_until``, a bounded poll with backoff; nothing sleeps for a
fixed time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from gateway_harness import GATEWAY_AE, GatewayProcess, destination_config, gateway_config
from peers import Peers, StoreSCP, free_port, make_us_image, run_storescu, wait_until

from bench.measure import Landing
from gateway import cli

SEED = 20240305
IMAGES = 500
DELIVERY_TIMEOUT = 120.0


def received_uids(pacs: StoreSCP) -> set[str]:
    """storescp names each file ``<modality>.<SOP Instance UID>`` (a resend overwrites it)."""
    return {path.name.split(".", 1)[1] for path in pacs.received_files()}


def crash_config(tmp_path: Path, port: int, test_port: int, prod_port: int) -> Path:
    return gateway_config(
        tmp_path,
        {"PACS_TEST": destination_config(test_port, "TESTPACS"),
         "PACS_PROD": destination_config(prod_port, "PRODPACS")},
        "rules:\n  - name: everything\n    destinations: [PACS_TEST, PACS_PROD]\n",
        port=port,
    )


@pytest.mark.peer
def test_kill_9_during_forwarding_loses_nothing(
    tmp_path: Path, peers: Peers, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    kill_after = rng.randint(20, 200)
    images = [tmp_path / "images" / f"us-{i:04d}.dcm" for i in range(IMAGES)]
    # 64 x 128 RGB: 24 KiB of pixels each
    sent = {str(make_us_image(p, seed=i, rows=64, cols=128).SOPInstanceUID) for i, p in enumerate(images)}
    port, test_port, prod_port = free_port(), free_port(), free_port()
    config = crash_config(tmp_path, port, test_port, prod_port)
    log = tmp_path / "gateway.log"

    first = GatewayProcess(config, log).start()
    try:
        stored = run_storescu(port, images, calling_ae="US_ROOM1", called_ae=GATEWAY_AE, timeout=120)
        assert stored.returncode == 0, stored.stderr  # every image acknowledged, both PACS down
        # --fork: the gateway connects as soon as a port opens; readiness must not queue behind it
        test_pacs = peers.store_scp(ae_title="TESTPACS", port=test_port, fork=True)
        prod_pacs = peers.store_scp(ae_title="PRODPACS", port=prod_port, fork=True)
        # woken by each file storescp finishes (inotify), not by a poll whose backoff could let
        # forwarding finish before it looks: the kill lands within a few images of kill_after
        with Landing([test_pacs.directory]) as landing:
            already = len(test_pacs.received_files())  # landed before the watch began
            landing.wait(kill_after - already, DELIVERY_TIMEOUT)
    finally:
        first.kill()
    at_kill = (len(received_uids(test_pacs)), len(received_uids(prod_pacs)))
    assert min(at_kill) < IMAGES, f"forwarding had finished before the kill: {at_kill}"

    second = GatewayProcess(config, log).start()
    try:
        wait_until(
            lambda: all(len(received_uids(pacs)) >= IMAGES for pacs in (test_pacs, prod_pacs)),
            what="every image at both PACS after the restart",
            timeout=DELIVERY_TIMEOUT,
        )
        exit_code = second.terminate()
    finally:
        second.kill()
    assert exit_code == 0, second.log_tail()

    assert received_uids(test_pacs) == sent
    assert received_uids(prod_pacs) == sent
    assert cli.main(["queue", "list", "--json", "--config", str(config)]) == 0
    listing = json.loads(capsys.readouterr().out)
    queues = listing["destinations"]
    assert all(queues.get(name, {"pending": 0})["pending"] == 0 for name in ("PACS_TEST", "PACS_PROD"))
    assert all(queues.get(name, {"dead": 0})["dead"] == 0 for name in ("PACS_TEST", "PACS_PROD"))
    assert listing["held"] == 0
