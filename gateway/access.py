"""Who may associate: known modalities by calling AE title and, optionally, source address. Pure.

An empty modality list keeps the gateway open to every calling AE (a warning is logged at start-up).
Rejections follow PS3.8: an unknown calling AE, or a known one calling from an address not listed for
it, is rejected-permanent, service-user, calling-AE-title-not-recognized (1,1,3).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from gateway.dicom.events import Rejection
from gateway.routing import InNetwork, IPNetwork
from gateway.settings import Modality


class AccessPolicy:
    def __init__(self, modalities: Sequence[Modality]) -> None:
        networks: dict[str, tuple[IPNetwork, ...]] = {}
        for modality in modalities:
            listed = tuple(ipaddress.ip_network(a, strict=False) for a in modality.addresses)
            networks[modality.ae_title] = networks.get(modality.ae_title, ()) + listed
        # the routing condition does the address test (IPv4-mapped IPv6 counted as IPv4)
        self._addresses = {ae: InNetwork(listed) for ae, listed in networks.items()}

    @property
    def open(self) -> bool:
        """True when no modality is configured: every calling AE is accepted."""
        return not self._addresses

    def check(self, calling_ae: str, peer_ip: str) -> Rejection | None:
        if self.open:
            return None
        addresses = self._addresses.get(calling_ae.strip(" "))
        if addresses is None:
            return Rejection(1, 1, 3, "calling_ae")
        if addresses.networks and not addresses((peer_ip,)):
            return Rejection(1, 1, 3, "source_ip")
        return None
