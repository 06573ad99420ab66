"""The operations endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on a tiny HTTP/1.1 server.

Theory of operation: one request per connection (``Connection: close`` always). The request line and
headers are read with a size cap and a deadline; a request body is never read. A peer that sends
garbage gets 400, one whose head is too large gets 431, one that stays silent or trickles is dropped
when the deadline passes. After answering, the server half-closes and waits (within the deadline)
for the client to close, so a reset never destroys the response in flight. Every connection runs in
the server's task group, so cancelling ``serve`` ends them all; at most ``max_connections`` are
served at once, the rest are closed at once.

Deciding the answer (``answer``) is separate from the socket work, and is the one place where an
unexpected exception is caught: it becomes a 500 and a log line, never a dead server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.errors import GatewayError

_log = logging.getLogger(__name__)

TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_LINGER_READS: Final = 16
_NETWORK_ERRORS: Final = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the gateway should receive traffic; ``reasons`` names each failed check."""

    ready: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    allow: str | None = None


def parse_request_line(head: bytes) -> tuple[str, str] | None:
    """``(method, path without query)`` from a request head, or None if it is not HTTP/1.x."""
    line = head.split(b"\r\n", 1)[0]
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if not method.isalpha() or not method.isupper() or not version.startswith("HTTP/1."):
        return None
    if not target.startswith("/"):
        return None
    return method, target.split("?", 1)[0]


def encode(response: Response, *, head_only: bool) -> bytes:
    """The full HTTP/1.1 response; ``head_only`` keeps Content-Length but drops the body."""
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
    ]
    if response.allow:
        lines.append(f"Allow: {response.allow}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + response.body


class HttpServer:
    """Serves the operations endpoints for one registry and one readiness check."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Callable[[], Readiness],
        *,
        request_timeout: float = 5.0,
        max_header_bytes: int = 8192,
        max_connections: int = 64,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._timeout = request_timeout
        self._max_header = max_header_bytes
        self._limiter = anyio.CapacityLimiter(max_connections)
        self._before_scrape = before_scrape

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through ``task_status``, serve until cancelled."""
        try:
            listener = await anyio.create_tcp_listener(local_host=self._host, local_port=self._port)
        except OSError as exc:
            raise GatewayError(
                f"cannot listen for HTTP on {self._host}:{self._port} ({exc.strerror}); "
                "free the port or change http_host/http_port"
            ) from None
        async with listener:
            task_status.started(listener.extra_attributes[SocketAttribute.local_port]())
            await listener.serve(self._connection)

    def answer(self, method: str, path: str) -> Response:
        """The response to one parsed request."""
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", allow="GET, HEAD")
        try:
            return self._route(path)
        except Exception:
            _log.exception("HTTP %s failed", path)
            return Response(500, b"internal error, see the gateway log\n")

    def _route(self, path: str) -> Response:
        if path == "/metrics":
            return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            return _readiness_response(self._readiness())
        return Response(404, b"not found: try /metrics, /healthz or /readyz\n")

    async def _connection(self, stream: SocketStream) -> None:
        async with stream:
            try:
                self._limiter.acquire_nowait()
            except anyio.WouldBlock:
                return
            try:
                await self._exchange(stream)
            except _NETWORK_ERRORS:
                pass
            finally:
                self._limiter.release()

    async def _exchange(self, stream: SocketStream) -> None:
        response: Response | None = None
        head_only = False
        with anyio.move_on_after(self._timeout):
            response, head_only = await self._read_request(stream)
        if response is not None:
            with anyio.move_on_after(self._timeout):
                await stream.send(encode(response, head_only=head_only))
                await _linger(stream)

    async def _read_request(self, stream: SocketStream) -> tuple[Response, bool]:
        reader = BufferedByteReceiveStream(stream)
        try:
            head = await reader.receive_until(b"\r\n\r\n", self._max_header)
        except anyio.DelimiterNotFound:
            return Response(431, b"request head too large\n"), False
        request = parse_request_line(head)
        if request is None:
            return Response(400, b"bad request\n"), False
        method, path = request
        if path == "/metrics" and self._before_scrape is not None:
            await self._before_scrape()  # state read at scrape time (e.g. journal counts)
        return self.answer(method, path), method == "HEAD"


async def _linger(stream: SocketStream) -> None:
    """Half-close, then discard what the client still sends until it closes: closing with unread
    input would make the kernel send a reset that can destroy the response in flight."""
    await stream.send_eof()
    for _ in range(_LINGER_READS):
        await stream.receive()


def _readiness_response(readiness: Readiness) -> Response:
    if readiness.ready:
        return Response(200, b"ready\n")
    lines = ["not ready:", *(f"- {reason}" for reason in readiness.reasons)]
    return Response(503, ("\n".join(lines) + "\n").encode("utf-8"))
