"""DICOM TLS: inbound (DCMTK and pynetdicom clients, mutual TLS, refused clients) and outbound (to a
TLS storescp), plus the start-up checks of certificate files. Certificates are made per test run."""

from __future__ import annotations

import datetime
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway_harness import GatewayThread
from peers import StoreSCP, make_us_image, run_echoscu, run_storescu
from pydicom import dcmread
from pynetdicom import AE

from gateway.errors import ConfigError
from gateway.settings import Destination, PeerTLS, ServerTLS, Settings
from gateway.tls import check_certificate, client_context, server_context

DAY = datetime.timedelta(days=1)
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    expired_cert: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, Any] | None,
                 *, ca: bool = False, valid: tuple[datetime.datetime, datetime.datetime] | None = None,
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    start, end = valid or (now - DAY, now + 30 * DAY)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("Test Hospital CA", ca_key, None, ca=True)
    server_key, client_key, rogue_key, expired_key = _key(), _key(), _key(), _key()
    now = datetime.datetime.now(datetime.UTC)
    return Pki(
        ca=_write_cert(d / "ca.pem", ca),
        server_cert=_write_cert(d / "server.pem", _certificate("gateway", server_key,
                                                               ("Test Hospital CA", ca_key))),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", _certificate("US_ROOM3", client_key,
                                                               ("Test Hospital CA", ca_key))),
        client_key=_write_key(d / "client.key", client_key),
        rogue_cert=_write_cert(d / "rogue.pem", _certificate("intruder", rogue_key,
                                                             ("Somebody Else CA", rogue_ca_key))),
        rogue_key=_write_key(d / "rogue.key", rogue_key),
        expired_cert=_write_cert(d / "expired.pem", _certificate(
            "old", expired_key, None, valid=(now - 60 * DAY, now - DAY))),
    )


def _settings(tmp_path: Path, pki: Pki, **extra: Any) -> Settings:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    tls = ServerTLS(port=0, certificate=pki.server_cert, private_key=pki.server_key,
                    ca_bundle=pki.ca, require_client_certificate=True, plain=False)
    return Settings(host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool",
                    rules_dir=rules, tls=tls, **extra)


def _tls_args(pki: Pki, cert: Path, key: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def pixels_by_uid(paths: list[Path]) -> dict[str, bytes]:
    return {ds.SOPInstanceUID: ds.PixelData for ds in map(dcmread, paths)}


@pytest.mark.peer
def test_dcmtk_and_pynetdicom_over_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    images = [tmp_path / f"us-{seed}.dcm" for seed in range(3)]
    for seed, image in enumerate(images):
        make_us_image(image, seed)  # 640 x 480 RGB: many PDUs, back-pressure through TLS
    with GatewayThread(_settings(tmp_path, pki)) as gw:
        assert gw.bound is not None and gw.bound.dicom_port is None  # plain listener disabled
        tls = _tls_args(pki, pki.client_cert, pki.client_key)
        echo = run_echoscu(gw.tls_port, called_ae="DICOMGW", extra_args=tls)
        assert echo.returncode == 0, echo.stderr
        store = run_storescu(gw.tls_port, images, called_ae="DICOMGW", extra_args=tls)
        assert store.returncode == 0, store.stderr

        context = ssl.create_default_context(cafile=pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", gw.tls_port, ae_title="DICOMGW",
                             tls_args=(context, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    stored = sorted((tmp_path / "spool" / "objects").rglob("*.dcm"))
    assert pixels_by_uid(stored) == pixels_by_uid(images)


@pytest.mark.peer
def test_refused_clients(tmp_path: Path, pki: Pki) -> None:
    with GatewayThread(_settings(tmp_path, pki)) as gw:
        rogue = run_echoscu(gw.tls_port, called_ae="DICOMGW",
                            extra_args=_tls_args(pki, pki.rogue_cert, pki.rogue_key))
        assert rogue.returncode != 0  # a client certificate from a CA we do not trust
        anonymous = run_echoscu(gw.tls_port, called_ae="DICOMGW", extra_args=["-tls"])
        assert anonymous.returncode != 0  # plain TCP on the TLS port

        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1  # deprecated in Python: that is the point
        old.load_cert_chain(pki.client_cert, pki.client_key)
        with socket.create_connection(("127.0.0.1", gw.tls_port), 5) as raw, \
                pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost").do_handshake()

        no_cert = ssl.create_default_context(cafile=pki.ca)
        with socket.create_connection(("127.0.0.1", gw.tls_port), 5) as raw, \
                no_cert.wrap_socket(raw, server_hostname="localhost") as conn, \
                pytest.raises((ssl.SSLError, ConnectionError)):
            conn.sendall(b"\x01\x00\x00\x00\x00\x04abcd")
            if not conn.recv(1):  # TLS 1.3 reports the missing certificate at the first read
                raise ConnectionError("closed")

        good = run_echoscu(gw.tls_port, called_ae="DICOMGW",
                           extra_args=_tls_args(pki, pki.client_cert, pki.client_key))
        assert good.returncode == 0, good.stderr  # and the gateway still serves


@pytest.mark.peer
def test_forwarding_to_a_tls_storescp(tmp_path: Path, pki: Pki,
                                      store_scp: Callable[..., StoreSCP]) -> None:
    pacs = store_scp(ae_title="PACS_TLS", fork=True,
                     extra_args=["+tls", str(pki.server_key), str(pki.server_cert),
                                 "+cf", str(pki.ca)])
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text("rules:\n  - name: all\n    destinations: [PACS_TLS]\n")
    peer_tls = PeerTLS(ca_bundle=pki.ca, certificate=pki.client_cert, private_key=pki.client_key)
    settings = Settings(host="127.0.0.1", port=0, http_port=0, spool_dir=tmp_path / "spool",
                        rules_dir=rules, destinations={"PACS_TLS": Destination(
                            ae_title="PACS_TLS", host="127.0.0.1", port=pacs.port, tls=peer_tls)})
    images = [tmp_path / f"us-{seed}.dcm" for seed in range(3)]
    for seed, image in enumerate(images):
        make_us_image(image, seed)  # 640 x 480 RGB: our sender's blocks and pauses, over TLS
    with GatewayThread(settings) as gw:
        assert run_storescu(gw.port, images, called_ae="DICOMGW").returncode == 0
        gw.wait_for(lambda g: g.delivered("PACS_TLS") == len(images), 60)
    assert pixels_by_uid(pacs.received_files()) == pixels_by_uid(images)


def test_contexts_follow_bcp195(pki: Pki) -> None:
    server = server_context(ServerTLS(port=0, certificate=pki.server_cert,
                                      private_key=pki.server_key, ca_bundle=pki.ca,
                                      require_client_certificate=True))
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    names = {c["name"] for c in server.get_ciphers()}
    assert names and all("GCM" in n or "CHACHA20" in n for n in names)
    client = client_context(PeerTLS(ca_bundle=pki.ca))
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2 and client.check_hostname


def test_unreadable_and_expired_certificates_are_clear_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expired on"):
        check_certificate(pki.expired_cert, "tls.certificate")
    with pytest.raises(ConfigError, match="cannot read"):
        check_certificate(tmp_path / "missing.pem", "tls.certificate")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        check_certificate(garbage, "tls.certificate")
    with pytest.raises(ConfigError, match="do not load"):
        server_context(ServerTLS(port=0, certificate=pki.server_cert, private_key=pki.client_key))
