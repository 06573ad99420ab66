"""TLS contexts for DICOM TLS (PS3.15 B.1/B.9, BCP 195): TLS 1.2 minimum, 1.3 preferred, AEAD
ciphers with forward secrecy only. Certificates are checked at start-up (readable, PEM, within their
validity period) so a bad path or an expired certificate is a clear error, not a failed handshake."""

from __future__ import annotations

import datetime
import ssl
from functools import cache
from pathlib import Path

from cryptography import x509

from gateway.errors import ConfigError
from gateway.settings import Peer, PeerTLS, ServerTLS

BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(config: ServerTLS) -> ssl.SSLContext:
    context = _base(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, config.certificate, config.private_key, "tls")
    if config.ca_bundle is not None:
        _load_ca(context, config.ca_bundle, "tls.ca_bundle")
    context.verify_mode = ssl.CERT_REQUIRED if config.require_client_certificate else (
        ssl.CERT_OPTIONAL if config.ca_bundle is not None else ssl.CERT_NONE)
    return context


@cache
def client_context(config: PeerTLS) -> ssl.SSLContext:
    context = _base(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = config.check_hostname
    if config.ca_bundle is not None:
        _load_ca(context, config.ca_bundle, "tls.ca_bundle")
    if config.certificate is not None and config.private_key is not None:
        _load_chain(context, config.certificate, config.private_key, "tls")
    return context


def _load_chain(context: ssl.SSLContext, certificate: Path, key: Path, where: str) -> None:
    check_certificate(certificate, f"{where}.certificate")
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        raise ConfigError(f"{where}: {certificate} and {key} do not load as a PEM certificate and "
                          f"its private key ({exc.reason}); check the paths and formats") from None
    except OSError as exc:
        raise ConfigError(f"{where}.private_key: cannot read {key}: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, bundle: Path, where: str) -> None:
    check_certificate(bundle, where)
    try:
        context.load_verify_locations(cafile=bundle)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(f"{where}: cannot load {bundle} as PEM CA certificates: {exc}") from None


def check_certificate(path: Path, where: str, now: datetime.datetime | None = None) -> None:
    """Readable PEM, and (for the first certificate in the file) within its validity period."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        certificate = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise ConfigError(f"{where}: {path} holds no PEM certificate") from None
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment > certificate.not_valid_after_utc:
        raise ConfigError(f"{where}: the certificate in {path} expired on "
                          f"{certificate.not_valid_after_utc:%Y-%m-%d}; renew it")
    if moment < certificate.not_valid_before_utc:
        raise ConfigError(f"{where}: the certificate in {path} is not valid before "
                          f"{certificate.not_valid_before_utc:%Y-%m-%d}; check the clock")


def peer_ssl(peer: Peer) -> ssl.SSLContext | None:
    """The client context for calling ``peer``, or None for plain TCP."""
    return client_context(peer.tls) if peer.tls is not None else None
