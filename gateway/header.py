"""The routing-relevant view of one received instance: who sent it, and a few of its attributes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


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


def header_from_dataset(
    dataset: Any,
    keywords: Iterable[str],
    *,
    calling_ae: str,
    called_ae: str,
    source_ip: str,
) -> Header:
    """Extract ``keywords`` from a pydicom ``Dataset`` (read with ``stop_before_pixels``)."""
    attributes: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        element = dataset.get(keyword)
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
