"""TLS and mTLS for the gRPC server and the Python client, with certificate files re-read in place.

grpc asks the server's certificate fetcher for a configuration on every new TLS handshake, so a
rotated certificate (a Kubernetes Secret update, a cert-manager renewal) reaches new connections
without a restart, and open connections keep the one they were made with. The fetcher only stats
the files; it re-reads them when one's inode, size or mtime changed, or at once on SIGHUP
(`reload_certificates`). A replacement that does not load (half written, a key that does not
match) is logged and the pair already served stays.
"""

from __future__ import annotations

import logging
import ssl
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # the client imports this module and needs no settings schema
    from monitor.config import Settings

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the setting and the file."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for `settings` (mTLS with `tls_client_ca`), None without `tls_cert`.

    Raises TlsError, naming the file, for a missing or unreadable file, one that is not PEM, or a
    key that does not match the certificate.
    """
    _check_pair(settings.tls_cert, settings.tls_key, "tls_cert", "tls_key")
    if settings.tls_cert is None:
        if settings.tls_client_ca is not None:
            raise TlsError("tls_client_ca needs tls_cert and tls_key: mTLS is TLS plus client certificates")
        return None
    return CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca).credentials()


def add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind `settings.bind` with TLS when configured, in plain text otherwise; the port bound (0 = failed)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(settings.bind)
    return server.add_secure_port(settings.bind, credentials)


def channel_credentials(ca: Path | str | None = None, cert: Path | str | None = None,
                        key: Path | str | None = None) -> grpc.ChannelCredentials:
    """Client TLS: trust `ca` (None = the system's roots) and, for mTLS, present `cert` with `key`."""
    _check_pair(cert, key, "tls_cert", "tls_key")
    return grpc.ssl_channel_credentials(_read("tls_ca", ca) if ca else None, _read("tls_key", key) if key else None,
                                        _read("tls_cert", cert) if cert else None)


def reload_certificates() -> None:
    """Re-read every server's certificate files now (the SIGHUP handler); new connections get them."""
    for files in list(_LIVE):
        files.reload()


class CertificateFiles:
    """A server's certificate, key and client CA files, and the grpc fetcher that serves their latest
    good contents."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None):
        self.paths = {"tls_cert": Path(cert), "tls_key": Path(key)}
        if client_ca is not None:
            self.paths["tls_client_ca"] = Path(client_ca)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._contents = self._load()  # TlsError here is a startup error
        self._pending: grpc.ServerCertificateConfiguration | None = None
        _LIVE.add(self)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._configuration(), self._fetch,
                                                   require_client_authentication="tls_client_ca" in self.paths)

    def reload(self) -> None:
        with self._lock:
            self._update(force=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, on every handshake: a new configuration once the files changed, else None."""
        with self._lock:
            self._update(force=False)
            pending, self._pending = self._pending, None
        return pending

    def _update(self, force: bool) -> None:
        stamp = self._stat()
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp  # taken before reading: a file changed meanwhile is read again at the next handshake
        try:
            contents = self._load()
        except TlsError as e:
            log.warning("TLS: keeping the certificate already served: %s", e)
            return
        if contents != self._contents:
            self._contents = contents
            self._pending = self._configuration()
            log.info("TLS: new connections use the reloaded %s", ", ".join(map(str, self.paths.values())))

    def _stat(self) -> tuple:
        def stamp(path: Path):
            try:
                s = path.stat()
            except OSError:
                return None
            return s.st_ino, s.st_size, s.st_mtime_ns

        return tuple(stamp(p) for p in self.paths.values())

    def _load(self) -> dict[str, bytes]:
        contents = {setting: _read(setting, path) for setting, path in self.paths.items()}
        _check_certificates("tls_cert", self.paths["tls_cert"], contents["tls_cert"])
        if "tls_client_ca" in self.paths:
            _check_certificates("tls_client_ca", self.paths["tls_client_ca"], contents["tls_client_ca"])
        _check_key(self.paths["tls_cert"], self.paths["tls_key"])
        return contents

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        c = self._contents
        return grpc.ssl_server_certificate_configuration([(c["tls_key"], c["tls_cert"])],
                                                         root_certificates=c.get("tls_client_ca"))


_LIVE: weakref.WeakSet[CertificateFiles] = weakref.WeakSet()  # alive as long as their server's credentials


def _check_pair(cert, key, cert_name: str, key_name: str) -> None:
    if (cert is None) != (key is None):
        raise TlsError(f"{cert_name} and {key_name} go together: give both, or neither")


def _read(setting: str, path: Path | str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{setting} {path}: no such file") from None
    except OSError as e:
        raise TlsError(f"{setting} {path}: cannot read it ({e.strerror or e})") from None


def _check_certificates(setting: str, path: Path, data: bytes) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, ValueError):  # ValueError: empty or not ASCII
        raise TlsError(f"{setting} {path}: not a PEM certificate") from None


def _check_key(cert: Path, key: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise TlsError(f"tls_key {key} does not match the certificate in tls_cert {cert}") from None
        raise TlsError(f"tls_key {key}: not an unencrypted PEM private key") from None
    except OSError as e:  # the file went away between reading and checking
        raise TlsError(f"tls_key {key}: cannot read it ({e.strerror or e})") from None


__all__ = ["CertificateFiles", "TlsError", "add_port", "channel_credentials", "reload_certificates",
           "server_credentials"]
