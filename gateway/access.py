"""Who may associate: known modalities by calling AE title and, optionally, source address. Pure.

An empty modality list keeps the gateway open to every calling AE (a warning is logged at start-up).
Rejections follow PS3.8: an unknown calling AE, or a known one calling from an address not listed for
it, is rejected-permanent, service-user, calling-AE-title-not-recognized (1,1,3).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from gateway.dicom.events import Rejection
from gateway.settings import Modality

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessPolicy:
    def __init__(self, modalities: Sequence[Modality]) -> None:
        self._networks: dict[str, tuple[IPNetwork, ...]] = {}
        for modality in modalities:
            networks = tuple(ipaddress.ip_network(a, strict=False) for a in modality.addresses)
            self._networks[modality.ae_title] = self._networks.get(modality.ae_title, ()) + networks

    @property
    def open(self) -> bool:
        """True when no modality is configured: every calling AE is accepted."""
        return not self._networks

    def check(self, calling_ae: str, peer_ip: str) -> Rejection | None:
        if self.open:
            return None
        networks = self._networks.get(calling_ae.strip(" "))
        if networks is None:
            return Rejection(1, 1, 3, "calling_ae")
        if networks and not _in_any(peer_ip, networks):
            return Rejection(1, 1, 3, "source_ip")
        return None


def _in_any(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks if ip.version == network.version)
