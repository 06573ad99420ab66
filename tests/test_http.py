"""gateway.http on a real loopback socket, driven by a raw asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from gateway.errors import GatewayError
from gateway.http import HttpServer, Readiness, Response, encode, parse_request_line
from gateway.metrics import DestinationState, GatewayState, Metrics

WAIT = 5.0  # upper bound of every wait in this file; the happy path takes milliseconds


@asynccontextmanager
async def running(
    readiness: Callable[[], Readiness] = lambda: Readiness(True),
    registry: CollectorRegistry | None = None,
    **options: float,
) -> AsyncIterator[int]:
    server = HttpServer("127.0.0.1", 0, registry or CollectorRegistry(), readiness, **options)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(server.serve)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, read until the server closes the connection."""
    with anyio.fail_after(WAIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    raw = await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return split(raw)


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", ("GET", "/metrics")),
        (b"HEAD /readyz?verbose=1 HTTP/1.0\r\n\r\n", ("HEAD", "/readyz")),
        (b"get /metrics HTTP/1.1\r\n\r\n", None),
        (b"GET /metrics\r\n\r\n", None),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", None),
        (b"GET metrics HTTP/1.1\r\n\r\n", None),
        (b"GET /metrics SPDY/3\r\n\r\n", None),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n", None),
    ],
)
def test_parse_request_line(head: bytes, expected: tuple[str, str] | None) -> None:
    assert parse_request_line(head) == expected


def test_encode_head_only_keeps_length() -> None:
    full = encode(Response(200, b"hello"), head_only=False)
    head = encode(Response(200, b"hello"), head_only=True)
    assert full.endswith(b"\r\n\r\nhello")
    assert head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 5\r\n" in head
    assert b"Connection: close\r\n" in head


# --- endpoints ---------------------------------------------------------------------------------


async def test_metrics_endpoint() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, destinations=["pacs_prod"], version="1.2.3")
    metrics.attach_state(
        lambda: GatewayState(destinations={"pacs_prod": DestinationState(17, 100, 3.0, 0)})
    )
    async with running(registry=registry) as port:
        status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    text = body.decode()
    assert 'dicomgw_build_info{version="1.2.3"} 1.0' in text
    assert 'dicomgw_queue_items{destination="pacs_prod"} 17.0' in text


async def test_healthz_and_unknown_paths() -> None:
    async with running() as port:
        assert (await get(port, "/healthz"))[::2] == (200, b"ok\n")
        status, _, body = await get(port, "/nope")
        assert status == 404
        assert b"/metrics" in body
        status, headers, _ = await get(port, "/healthz", method="POST")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert (await get(port, "/metrics?x=1"))[0] == 200


async def test_head_has_no_body() -> None:
    async with running() as port:
        status, headers, body = await get(port, "/healthz", method="HEAD")
    assert status == 200
    assert headers["content-length"] == "3"
    assert body == b""


async def test_readiness_flips() -> None:
    state = Readiness(True)
    async with running(readiness=lambda: state) as port:
        assert (await get(port, "/readyz"))[::2] == (200, b"ready\n")
        state = Readiness(False, ("spool above high-water mark", "rules not loaded"))
        status, _, body = await get(port, "/readyz")
        assert status == 503
        assert body == b"not ready:\n- spool above high-water mark\n- rules not loaded\n"
        state = Readiness(True)
        assert (await get(port, "/readyz"))[0] == 200


async def test_failing_check_is_a_500_and_server_survives() -> None:
    def broken() -> Readiness:
        raise RuntimeError("bug")

    async with running(readiness=broken) as port:
        assert (await get(port, "/readyz"))[0] == 500
        assert (await get(port, "/healthz"))[0] == 200


# --- hostile clients ---------------------------------------------------------------------------


async def test_garbage_gets_400_then_server_still_works() -> None:
    async with running(request_timeout=0.5) as port:
        raw = await exchange(port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
        assert split(raw)[0] == 400
        assert (await get(port, "/healthz"))[0] == 200


async def test_oversize_head_gets_431() -> None:
    async with running(max_header_bytes=1024) as port:
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 4096)
        assert split(raw)[0] == 431
        assert (await get(port, "/healthz"))[0] == 200


async def test_silent_connection_is_closed_without_blocking_others() -> None:
    async with running(request_timeout=0.3) as port:
        with anyio.fail_after(WAIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # ... and then nothing more (slowloris)
            await writer.drain()
            assert (await get(port, "/healthz"))[0] == 200  # served while the other one hangs
            assert await reader.read() == b""  # dropped by the server after its deadline
            writer.close()
        assert (await get(port, "/healthz"))[0] == 200


async def test_connections_beyond_the_limit_are_closed() -> None:
    async with running(request_timeout=0.3, max_connections=1) as port:
        with anyio.fail_after(WAIT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                refused = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                refused = b""
            assert refused == b""
            assert await reader.read() == b""
            writer.close()
        assert (await get(port, "/healthz"))[0] == 200


async def test_port_in_use_is_a_gateway_error() -> None:
    async with running() as port:
        server = HttpServer("127.0.0.1", port, CollectorRegistry(), lambda: Readiness(True))
        with anyio.fail_after(WAIT), pytest.raises(GatewayError, match="http_port"):
            await server.serve()
