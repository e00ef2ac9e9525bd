"""TLS on the server's port: --tls-cert and --tls-key (and --tls-client-ca for mutual TLS).

The files are read and checked at start (a certificate that does not match its key, an
encrypted key, a file that holds no certificate: the server refuses to start, saying
which), and read again when they change: gRPC asks for the certificate at each new
connection's handshake, and gets the new one once its files have changed and check out.
A rotated certificate (cert-manager, a renewal cron) is served without a restart, and
connections already open keep theirs. A change that does not check out (a half-written
file, a key that does not match the new certificate) is logged once and the certificate
in use stays.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from flowsvc.logs import event as log_event

logger = logging.getLogger("flowsvc.tls")


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Called by OpenSSL for an encrypted key: never prompt on a terminal.
    raise _EncryptedKey


class ServerTLS:
    """The certificate files of a server; `credentials()` for grpc's add_secure_port."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = tuple(p for p in (cert, key, client_ca) if p)
        self._lock = threading.Lock()  # handshakes may come from several of gRPC's threads
        try:
            self._stamp = self._stamps()
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        self._config = self._load()
        self._refused: tuple[tuple[int, int, int], ...] | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config,
            self._fetch,  # type: ignore[arg-type]  # None means "the same": grpc's stubs omit it
            require_client_authentication=bool(self.client_ca),
        )

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        """What tells a changed file: its inode (a file renamed over it, as Kubernetes
        does for a mounted secret), its size and its modification time."""
        stamps = []
        for path in self._paths:
            found = os.stat(path)
            stamps.append((found.st_ino, found.st_size, found.st_mtime_ns))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, once checked with the ssl module (which names
        what is wrong; gRPC would only fail each handshake). ValueError if they do not
        check out, or change while they are read."""
        try:
            cert, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
            client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except _EncryptedKey:
            raise ValueError(
                f"--tls-key {self.key} is encrypted: give the key unencrypted (readable "
                "by the server's user only)"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"--tls-cert {self.cert} and --tls-key {self.key} are not a PEM certificate "
                f"chain and its private key: {_reason(exc)}"
            ) from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"--tls-client-ca {self.client_ca} is not a PEM file of CA certificates: "
                    f"{_reason(exc)}"
                ) from None
        if self._stamps() != self._stamp:
            raise ValueError("the files changed while they were read")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new configuration, or None for the same."""
        with self._lock:
            try:
                stamp = self._stamps()
            except OSError:
                return None  # being replaced: the next handshake looks again
            if stamp in (self._stamp, self._refused):
                return None
            before, self._stamp = self._stamp, stamp
            try:
                config = self._load()
            except ValueError as exc:
                self._stamp = before
                self._refused = stamp
                log_event(
                    logger,
                    logging.WARNING,
                    "changed TLS files not taken; the certificate in use stays",
                    error=str(exc),
                )
                return None
            except Exception:  # a bug: never fail the handshake for it
                self._stamp = before
                self._refused = stamp
                logger.exception("reading the changed TLS files failed")
                return None
            self._config = config
            log_event(logger, logging.INFO, "TLS certificate reloaded", cert=self.cert)
            return config


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


__all__ = ["ServerTLS"]
