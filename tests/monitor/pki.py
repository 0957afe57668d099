"""Test certificates: two CAs, server certificates for 127.0.0.1 and localhost, client certificates.

Both CAs have RSA keys (fixed-length signatures) and names of one length, and every server
certificate has the same key, subject and validity, so the two server certificates are files
of one size: replacing one with the other in place, mtime restored, leaves the file's stat as
it was, which is what a test of SIGHUP needs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
SERVER_NAMES = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    def __init__(self, cn: str):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.name = _name(cn)
        self.cert = self._sign(self.name, self.key.public_key(), 1, ca=True)

    def issue(self, cn: str, key, serial: int, *, server: bool = False, expired: bool = False) -> x509.Certificate:
        return self._sign(_name(cn), key.public_key(), serial, server=server, expired=expired)

    def _sign(self, subject, public_key, serial, *, ca=False, server=False, expired=False) -> x509.Certificate:
        start, end = (NOW - dt.timedelta(days=2), NOW - dt.timedelta(days=1)) if expired else \
            (NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=1))
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
             .serial_number(serial).not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(SERVER_NAMES), critical=False)
        return b.sign(self.key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pki(folder: Path) -> dict[str, Path]:
    """Write every file into `folder`; returns {name: path}. `server.pem` is served first (CA 1,
    serial 1001); `server-next.pem` replaces it (CA 2, serial 1002, same size)."""
    ca1, ca2 = Authority("latentwatch test CA 1"), Authority("latentwatch test CA 2")
    server_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca1.pem": pem(ca1.cert),
        "ca2.pem": pem(ca2.cert),
        "server.pem": pem(ca1.issue("latentwatch", server_key, 1001, server=True)),
        "server-next.pem": pem(ca2.issue("latentwatch", server_key, 1002, server=True)),
        "server.key": _key_pem(server_key),
        "other.key": _key_pem(other_key),
        "client.pem": pem(ca1.issue("app", client_key, 2001)),
        "client-other-ca.pem": pem(ca2.issue("app", client_key, 2002)),
        "client-expired.pem": pem(ca1.issue("app", client_key, 2003, expired=True)),
        "client.key": _key_pem(client_key),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}
