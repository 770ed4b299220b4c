"""TLS for the services' gRPC servers and the orchestrator's channels, with certificates reloaded from their files.

A server with `--tls-cert` and `--tls-key` serves TLS only; with `--tls-client-ca` too, it also requires a client
certificate signed by that CA (mutual TLS) and refuses the handshake of any other caller. Kubernetes rotates a
mounted Secret in place: gRPC asks `CertificateFiles.fetch` at every new connection's handshake, which reads the
files again when they changed, so new connections get the new certificate and open ones keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


@dataclass
class CertificateFiles:
    """A server's certificate chain and key (and the CA of its clients for mutual TLS), as PEM files."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    _seen: tuple = field(default=(), repr=False)  # the files' (mtime_ns, size) when last loaded

    def _stamp(self) -> tuple:
        return tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (self.cert, self.key, self.client_ca) if p)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC's configuration; ValueError naming the file when they do not make a key pair."""
        stamp = self._stamp()
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        try:  # the standard library checks that the key matches the certificate, which gRPC would only log
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"tls_cert {self.cert} and tls_key {self.key} are not a matching PEM pair: {e}") from e
        client_ca = self.client_ca.read_bytes() if self.client_ca else None
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
        self._seen = stamp
        return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: the new configuration when a file changed, else None (keep the current).
        A half-written or broken pair is logged and skipped: the old certificate serves until the files are whole."""
        try:
            if self._stamp() == self._seen:
                return None
            config = self.load()
        except (OSError, ValueError) as e:
            log.warning("TLS files changed but cannot be loaded (the current certificate stays): %s", e)
            return None
        log.info("TLS certificate reloaded from %s", self.cert)
        return config

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.load(), self.fetch,
                                                   require_client_authentication=self.client_ca is not None)


def certificate_files(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> CertificateFiles | None:
    """From a service's settings: None without TLS; ValueError naming the setting when they do not fit together."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS runs over TLS)")
        return None
    if cert is None or key is None:
        raise ValueError("tls_cert and tls_key go together")
    for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}: {path} is not a file")
    files = CertificateFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    files.load()  # a bad pair fails the start-up, not the first handshake
    return files


def channel_credentials(ca: Path | None, client_cert: Path | None = None,
                        client_key: Path | None = None) -> grpc.ChannelCredentials:
    """A client's TLS: trust `ca` (None: the system's roots), and present a client certificate for mutual TLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("tls_client_cert and tls_client_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
