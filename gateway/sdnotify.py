"""systemd's notify protocol: READY=1 once the gateway listens and has recovered its spool,
WATCHDOG=1 from the event loop while it runs, STOPPING=1 on shutdown. A no-op without $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

import anyio


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if ours and usec.isdigit() and int(usec) > 0 else 0.0

    def notify(self, message: str) -> None:
        if not self.address:
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), self.address)

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval; runs until cancelled (no-op when not configured)."""
        if not self.watchdog_seconds:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(self.watchdog_seconds / 2)
