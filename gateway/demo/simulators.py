"""Simulated DICOM peers for the demo and for tests: a storage SCP (a PACS) and a worklist SCP (a RIS).

Both are pynetdicom servers running in their own threads (``start()`` returns at once, ``stop()``
shuts them down). Every setting is made on the ``AE`` object: pynetdicom's process-global
``_config`` is never touched, so importing or running a simulator leaves the gateway's process as
it was. Nothing here logs patient data.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

VERIFICATION = UID("1.2.840.10008.1.1")
MODALITY_WORKLIST_FIND = UID("1.2.840.10008.5.1.4.31")
MAX_ASSOCIATIONS = 64
MAX_PDU = 256 * 1024
UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
# pynetdicom accepts the first syntax of *this* list that the requestor offered: compressed and
# deflated syntaxes come first, so data offered in its own syntax (plus a fallback) is kept as is
ALL_TRANSFER_SYNTAXES = [
    *(ts for ts in AllTransferSyntaxes if ts not in UNCOMPRESSED),
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
]

SHUTDOWN_POLL = 0.02  # seconds: how often the accept loop looks for stop()
PACING_STEP = 0.0002  # seconds between two looks at the DUL's send queue
PACING_LIMIT = 5.0  # the longest wait for one response to leave

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700


def _set_nodelay(event: Event) -> None:
    """pynetdicom never disables Nagle; without this every response waits ~40 ms."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Server:
    """Start/stop plumbing shared by the simulators."""

    def __init__(self, ae: AE, host: str, port: int) -> None:
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.maximum_pdu_size = MAX_PDU
        ae.add_supported_context(VERIFICATION)
        self._ae = ae
        self.host = host
        self._port = port
        self._server: ThreadedAssociationServer | None = None

    def _handlers(self) -> list[EventHandlerType]:
        return [(evt.EVT_CONN_OPEN, _set_nodelay)]

    @property
    def ae_title(self) -> str:
        return str(self._ae.ae_title)

    @property
    def server(self) -> ThreadedAssociationServer | None:
        """The running pynetdicom server (its ``active_associations``), None when stopped."""
        return self._server

    @property
    def port(self) -> int:
        """The listening port (the one the OS chose at the first start when constructed with 0)."""
        return self._port

    def start(self) -> None:
        """Listen; returns once the socket is bound and accepting.

        Like ``ae.start_server(block=False)``, but polling for shutdown every 20 ms instead of
        500 ms, so that ``stop()`` is quick.
        """
        if self._server is not None:
            return
        server = self._ae.make_server(
            (self.host, self._port),
            evt_handlers=self._handlers(),
            server_class=ThreadedAssociationServer,
        )
        self._ae._servers.append(server)  # where server.shutdown() expects to find itself
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL},
            name=f"{type(self).__name__}@{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        self._server = server
        self._port = int(server.server_address[1])  # a restart listens on the same port

    def stop(self) -> None:
        """Stop listening and abort the associations in progress (a peer going down)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for association in server.active_associations:
            association.abort()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Storage


class StorageSimulator(_Server):
    """A PACS: accepts every storage SOP class in every transfer syntax pydicom knows (compressed
    data is stored as received), and writes each object as a Part-10 file into ``folder``.

    File names are ``<counter>-<random>.dcm``, never derived from anything the peer sent. Files
    appear atomically (written under a temporary name, then renamed). ``status`` is the C-STORE
    response status; with a failure status nothing is stored (a warning still stores), and
    ``comment``, when set, is sent as its Error Comment.
    """

    def __init__(
        self,
        ae_title: str,
        port: int,
        folder: Path,
        host: str = "127.0.0.1",
        *,
        status: int = STATUS_SUCCESS,
        require_called_aet: bool = True,
    ) -> None:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        super().__init__(ae, host, port)
        self.folder = folder
        self.status = status
        self.comment = ""
        self._numbers = itertools.count(1)
        self._count = 0
        self._changed = threading.Condition()

    def _handlers(self) -> list[EventHandlerType]:
        return [*super()._handlers(), (evt.EVT_C_STORE, self._on_store)]

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        super().start()

    @property
    def count(self) -> int:
        """How many objects were stored since construction."""
        with self._changed:
            return self._count

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` objects are stored; False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count >= count, timeout)

    def _on_store(self, event: Event) -> int | Dataset:
        status = self.status
        if not _stores(status):
            return self._answer(status)
        with self._changed:
            number = next(self._numbers)
        name = f"{number:08d}-{uuid.uuid4().hex[:12]}.dcm"
        try:
            _write_atomically(self.folder, name, event.encoded_dataset(include_meta=True))
        except OSError:
            return STATUS_OUT_OF_RESOURCES
        with self._changed:
            self._count += 1
            self._changed.notify_all()
        return status

    def _answer(self, status: int) -> int | Dataset:
        if not self.comment:
            return status
        answer = Dataset()
        answer.Status, answer.ErrorComment = status, self.comment
        return answer


def _stores(status: int) -> bool:
    return status in (0x0000, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    temporary = folder / f".{name}.part"
    with temporary.open("wb") as f:
        f.write(data)
    os.replace(temporary, folder / name)


# ---------------------------------------------------------------------------------------------
# Worklist


class WorklistSimulator(_Server):
    """A RIS: answers Modality Worklist C-FIND from ``items`` (see :func:`matches`), one result
    at a time, and stops with 0xFE00 when the caller sends C-CANCEL."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        items: Sequence[Dataset],
        host: str = "127.0.0.1",
        *,
        require_called_aet: bool = True,
    ) -> None:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.add_supported_context(MODALITY_WORKLIST_FIND, UNCOMPRESSED)
        super().__init__(ae, host, port)
        self.items = list(items)

    def _handlers(self) -> list[EventHandlerType]:
        return [*super()._handlers(), (evt.EVT_C_FIND, self._on_find)]

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        for item in self.items:
            _let_the_peer_speak(event)
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return
            if matches(query, item):
                yield STATUS_PENDING, answer(query, item)
        yield STATUS_SUCCESS, None


def _let_the_peer_speak(event: Event) -> None:
    """Wait (bounded) until the previous response has left.

    pynetdicom's DUL thread reads from the socket only when it has nothing left to send: a
    generator that yields faster than the DUL sends would starve it, and a C-CANCEL would never
    be read.
    """
    dul = event.assoc.dul
    deadline = time.monotonic() + PACING_LIMIT
    while not dul.to_provider_queue.empty() and event.assoc.is_established:
        if time.monotonic() > deadline:
            return
        time.sleep(PACING_STEP)


# ---------------------------------------------------------------------------------------------
# Matching (pure)

CHARSET = Tag("SpecificCharacterSet")
NOT_MATCHED = frozenset({CHARSET, Tag("QueryRetrieveLevel")})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
EXACT_VRS = frozenset({"UI", "DA", "TM", "DT", "US", "SS", "UL", "SL", "FL", "FD", "IS", "DS"})


def matches(query: Dataset, item: Dataset) -> bool:
    """Does ``item`` match the C-FIND identifier ``query`` (PS3.4 C.2.2.2, simplified)?

    Empty keys match anything; DA/TM/DT take ``a-b``, ``a-`` and ``-b`` ranges; ``*`` and ``?`` are
    wildcards in text keys; person names compare case-insensitively; a sequence key matches when
    one of the item's sequence items matches the query's first item.
    """
    return all(_element_matches(element, item) for element in query if element.tag not in NOT_MATCHED)


def _element_matches(key: DataElement, item: Dataset) -> bool:
    if key.VR == "SQ":
        return _sequence_matches(key, item)
    patterns = _values(key)
    if not patterns:
        return True
    if key.tag not in item:
        return False
    have = _values(item[key.tag])
    return any(_value_matches(key.VR, pattern, value) for pattern in patterns for value in have)


def _sequence_matches(key: DataElement, item: Dataset) -> bool:
    if not key.value or all(_is_universal(element) for element in key.value[0]):
        return True
    if key.tag not in item or item[key.tag].VR != "SQ":
        return False
    wanted = key.value[0]
    return any(matches(wanted, entry) for entry in item[key.tag].value)


def _is_universal(element: DataElement) -> bool:
    if element.tag in NOT_MATCHED:
        return True
    if element.VR == "SQ":
        return not element.value or all(_is_universal(e) for e in element.value[0])
    return not _values(element)


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None or value in ("", b""):
        return []
    if isinstance(value, list | tuple | MultiValue):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _value_matches(vr: str, pattern: str, value: str) -> bool:
    if vr in RANGE_VRS and "-" in pattern:
        low, high = pattern.split("-", 1)
        return (not low or value >= low) and (not high or value <= high)
    if vr == "PN":
        pattern, value = pattern.upper(), value.upper()
    if vr not in EXACT_VRS and ("*" in pattern or "?" in pattern):
        return _wildcard(pattern).fullmatch(value) is not None
    return pattern == value


def _wildcard(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)


def answer(query: Dataset, item: Dataset) -> Dataset:
    """``item`` reduced to the keys of ``query``: absent keys come back empty; a sequence key
    with an item returns each of the item's entries reduced to that item's keys."""
    result = Dataset()
    if CHARSET in item:
        result.add(copy.deepcopy(item[CHARSET]))
    for key in query:
        if key.tag == CHARSET:
            continue
        if key.tag not in item:
            result.add_new(key.tag, key.VR, DicomSequence() if key.VR == "SQ" else None)
            continue
        have = item[key.tag]
        if key.VR == "SQ" and key.value and have.VR == "SQ" and len(key.value[0]) > 0:
            reduced = [answer(key.value[0], entry) for entry in have.value]
            for entry in reduced:
                if CHARSET in entry:
                    del entry[CHARSET]
            result.add_new(key.tag, "SQ", DicomSequence(reduced))
        else:
            result.add(copy.deepcopy(have))
    return result
