"""The gateway's own exception tree (kept shallow on purpose).

Foreign errors (OSError, sqlite3.Error, pydicom/pynetdicom exceptions) are translated into these at
the boundary where they happen; every message says what the operator should do.
"""


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file or environment is invalid. Fix the named key and start again."""


class RulesError(GatewayError):
    """A rule file set is invalid; carries every problem found (file, line, field)."""


class SpoolFull(GatewayError):
    """The spool cannot take another object (high-water mark, ENOSPC, EIO, read-only)."""


class ProtocolError(GatewayError):
    """A peer broke the DICOM upper-layer or DIMSE protocol; the association is aborted."""


class AssociationRejected(GatewayError):
    """A peer rejected our A-ASSOCIATE-RQ."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")
        self.result = result
        self.source = source
        self.reason = reason


class AssociationAborted(GatewayError):
    """The association was aborted (A-ABORT received or the connection dropped)."""


class PeerUnreachable(GatewayError):
    """We could not open a TCP connection to a peer. ``kind``: connection_refused, connect_timeout,
    or connection_reset."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class PeerTimeout(GatewayError):
    """A peer did not answer within the configured timeout."""
