"""The routing-relevant view of one received instance: who sent it, and a few of its attributes."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.valuerep import VR


@dataclass(frozen=True, slots=True)
class Header:
    """What routing may look at. ``attributes`` maps a DICOM keyword to its values as strings.

    A missing attribute is absent from ``attributes``; a present but empty one maps to ``()``.
    Multi-valued attributes keep every value; PN values are the stored string (``Family^Given``).
    """

    calling_ae: str
    called_ae: str
    source_ip: str
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def configure_pydicom() -> None:
    """pydicom's process-wide policy for the gateway, set once by the composition root: values are
    not validated when read. Routing compares the stored strings as they are, and pydicom's
    validation warnings quote an invalid value (patient data) into the log and onto stderr."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def header_from_dataset(
    dataset: Any,
    keywords: Iterable[str],
    *,
    calling_ae: str,
    called_ae: str,
    source_ip: str,
) -> Header:
    """Extract ``keywords`` from a pydicom ``Dataset`` (read with ``stop_before_pixels``); a value
    pydicom cannot convert (a US value of odd length, say) raises ``HeaderUnreadable``."""
    attributes: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        try:  # pydicom converts a value on first access; its messages may quote the raw bytes
            element = dataset.get(keyword)
        except Exception as exc:
            raise HeaderUnreadable(f"cannot read {keyword} ({type(exc).__name__})") from None
        if element is None:
            continue
        attributes[keyword] = _as_strings(element)
    return Header(calling_ae, called_ae, source_ip, attributes)


def _as_strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, bytes):
        return (value.decode("latin-1"),)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return tuple(str(v) for v in value)
    return (str(value),)


class HeaderUnreadable(Exception):
    """The dataset's header could not be parsed (it is not a valid DICOM dataset)."""


def read_header(data: bytes, transfer_syntax: str, keywords: Iterable[str], *,
                complete: bool) -> Any:
    """Parse the elements routing needs from the first bytes of a dataset.

    Parsing stops after the last element of ``keywords`` (and always before Pixel Data). When
    ``complete`` is false, ``data`` is only a prefix: if it ends before every needed element was
    passed, ``PrefixTooShort`` is raised and the caller parses the whole file instead.
    ``HeaderUnreadable`` means the bytes are not a dataset at all (or one built to exhaust us:
    more than ``MAX_ELEMENTS`` top-level elements before the needed ones, a deflate bomb).
    """
    wanted = list(keywords)
    last = max((tag for tag in map(tag_for_keyword, wanted) if tag is not None), default=0)
    if transfer_syntax == DEFLATED_LE:
        data = _inflate(data)
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    if complete and data:
        _check_first_element(data, little)
    stream = io.BytesIO(data)
    counted = 0
    value_end = 0  # where the value of the last element parsed ends (pydicom does not check)

    def stop_when(tag: int, vr: str | None, length: int) -> bool:
        nonlocal counted, value_end
        counted += 1
        if counted > MAX_ELEMENTS or tag > last or tag >= _PIXEL_DATA:
            return True
        if length != _UNDEFINED_LENGTH:
            value_end = stream.tell() + length
        return False

    try:
        dataset = read_dataset(stream, implicit, little, stop_when=stop_when)
    except Exception as exc:  # pydicom raises many types on bad bytes; translated here
        # only the type: pydicom's messages may quote element values (patient data), and this
        # message reaches the log
        if not complete:
            raise PrefixTooShort(type(exc).__name__) from None
        raise HeaderUnreadable(f"cannot parse the dataset header ({type(exc).__name__})") from None
    if counted > MAX_ELEMENTS:
        raise HeaderUnreadable(f"more than {MAX_ELEMENTS} elements before the ones routing needs")
    truncated = value_end > len(data)  # the last value was cut short: never route on it
    if complete and truncated:
        raise HeaderUnreadable("the dataset ends inside a data element")
    ended = stream.tell() >= len(data)
    if not complete and (truncated or (ended and any(k not in dataset for k in wanted))):
        raise PrefixTooShort("the prefix ended before the needed elements")
    return dataset


def _inflate(data: bytes) -> bytes:
    """Inflate a deflated dataset (or a prefix of one), at most ``_MAX_HEADER`` bytes of it."""
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, _MAX_HEADER)
    except zlib.error as exc:
        raise HeaderUnreadable(f"the deflated dataset cannot be inflated: {exc}") from None


def _check_first_element(data: bytes, little: bool) -> None:
    """Random bytes are rejected here: the first element must have a valid explicit VR, or an
    implicit VR length that fits the data (the fallback pydicom applies)."""
    if len(data) < 8:
        raise HeaderUnreadable(f"{len(data)} bytes are too few for a data element")
    if data[4:6].decode("latin-1") in _VRS:
        return
    length = int.from_bytes(data[4:8], "little" if little else "big")
    if length != _UNDEFINED_LENGTH and length > len(data) - 8:
        raise HeaderUnreadable("the bytes do not start with a data element")


def read_header_file(path: Path, offset: int, transfer_syntax: str, keywords: Iterable[str]) -> Any:
    """``read_header`` on a whole spooled file (dataset at ``offset``), header part only."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(_MAX_HEADER)
    return read_header(data, transfer_syntax, keywords, complete=True)


class PrefixTooShort(Exception):
    """The buffered prefix did not reach every element routing needs."""


MAX_ELEMENTS = 1 << 16  # top-level elements parsed at most (64 MiB of zeros would take ~20 s)
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_VRS = frozenset(vr.value for vr in VR if len(vr.value) == 2)
_MAX_HEADER = 64 * 1024 * 1024
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
