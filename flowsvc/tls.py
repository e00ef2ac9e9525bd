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
import re
import ssl
import stat
import threading
from pathlib import Path

import grpc

from flowsvc.logs import event as log_event

logger = logging.getLogger("flowsvc.tls")


#: A PEM certificate, and a PEM private key of any kind (PKCS#8, PKCS#1, SEC1, encrypted).
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")

#: OpenSSL's reasons for a key that is not the certificate's: of the same type
#: (KEY_VALUES_MISMATCH) or of another (an RSA key for an EC certificate).
_NOT_ITS_KEY = frozenset({"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"})


#: OpenSSL's verify codes for a certificate a client refuses whoever it trusts: not yet
#: valid (9), expired (10), not for a server (26: its extended key usage lacks serverAuth).
_REFUSED_BY_CLIENTS = frozenset({9, 10, 26})


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
        self._refused: tuple[tuple[int, int, int, int], ...] | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """What add_secure_port takes: the files as loaded, and asked for again at each
        handshake (see _fetch)."""
        return grpc.dynamic_ssl_server_credentials(
            self._config,
            self._fetch,  # type: ignore[arg-type]  # None means "the same": grpc's stubs omit it
            require_client_authentication=bool(self.client_ca),
        )

    def _stamps(self) -> tuple[tuple[int, int, int, int], ...]:
        """What tells a changed file: its inode (a file renamed over it, as Kubernetes
        does for a mounted secret), its size, its modification time and its status change
        time (a chmod or chown: a file the server could not read may be readable now)."""
        stamps = []
        for path in self._paths:
            found = os.stat(path)
            stamps.append((found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, once checked with the ssl module (which names
        what is wrong; gRPC would only fail each handshake). ValueError if they do not
        check out, or change while they are read."""
        why = "the server reads it at start and again whenever it changes"
        cert, key = read_file(self.cert, why), read_file(self.key, why)
        client_ca = read_file(self.client_ca, why) if self.client_ca else None
        server = check_pair(self.cert, self.key, cert, key, server=True)
        kind = _key_kind(cert)
        if kind is not None:
            raise ValueError(
                f"--tls-cert {self.cert} holds {kind}, which gRPC's TLS does not serve with "
                "(every handshake would fail): give a certificate of an RSA, ECDSA P-256, "
                "P-384 or P-521, or Ed25519 key"
            )
        if self.client_ca:
            check_cas(self.client_ca, "--tls-client-ca")
        if self._stamps() != self._stamp:
            raise ValueError("the files changed while they were read")
        if refused := _refused_by_clients(server, self.cert):
            # Served all the same (the server's clock may be the one that is wrong), but
            # every handshake will fail on the client's side, where the server sees nothing.
            log_event(
                logger,
                logging.WARNING,
                "clients will refuse the TLS certificate",
                cert=self.cert,
                reason=refused,
            )
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


#: The keys gRPC's TLS (BoringSSL) serves with, by the algorithm of a certificate's public
#: key (and its curve), in DER. OpenSSL, which checks the files, takes more: a DSA, Ed448,
#: RSA-PSS, brainpool or secp256k1 key passed the checks, then gRPC refused to listen
#: ("cannot listen ...: Failed to bind") or, for a renewal, kept the certificate in use
#: while "TLS certificate reloaded" was logged.
_SERVED_KEYS = {
    (bytes.fromhex("2a864886f70d010101"), None),  # rsaEncryption
    (bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d030107")),  # EC, P-256
    (bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2b81040022")),  # EC, P-384
    (bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2b81040023")),  # EC, P-521
    (bytes.fromhex("2b6570"), None),  # Ed25519
}
_KEY_NAMES = {
    bytes.fromhex("2a8648ce380401"): "a DSA key",
    bytes.fromhex("2b6571"): "an Ed448 key",
    bytes.fromhex("2a864886f70d01010a"): "an RSA-PSS key",
}
_EC = bytes.fromhex("2a8648ce3d0201")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


def _key_kind(chain: bytes) -> str | None:
    """What key the first certificate of PEM `chain` (the one served) holds, if it is one
    gRPC cannot serve with; None if it can (or if the certificate cannot be read here:
    the ssl module's checks have passed, and gRPC is left to judge)."""
    found = _PEM_CERT.search(chain)
    if found is None:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(found.group().decode("ascii"))
        _, at, _ = _element(der, 0)  # Certificate
        _, at, _ = _element(der, at)  # its TBSCertificate
        if der[at] == 0xA0:  # [0] version
            at = _element(der, at)[2]
        for _ in range(5):  # serialNumber, signature, issuer, validity, subject
            at = _element(der, at)[2]
        _, at, _ = _element(der, at)  # subjectPublicKeyInfo
        _, at, end = _element(der, at)  # its AlgorithmIdentifier
        tag, start, after = _element(der, at)
        if tag != 0x06:
            return None
        algorithm, parameter = der[start:after], None
        if after < end and der[after] == 0x06:  # an EC key's named curve
            _, start, stop = _element(der, after)
            parameter = der[start:stop]
    except (ValueError, IndexError):
        return None
    if (algorithm, parameter) in _SERVED_KEYS:
        return None
    if algorithm == _EC:
        return f"an EC key on curve {_dotted(parameter)}"
    return _KEY_NAMES.get(algorithm) or f"a key of algorithm {_dotted(algorithm)}"


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at `at`: its tag, where its content starts, and where it ends."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("truncated")
    return tag, at, at + length


def _dotted(oid: bytes | None) -> str:
    """An OBJECT IDENTIFIER's content, in its dotted form ("1.3.101.113")."""
    if not oid:
        return "(not named: explicit parameters)"
    numbers, value = [], 0
    for byte in oid:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            numbers.append(value)
            value = 0
    if not numbers:  # every byte says "more follows": not an OID, shown as its bytes
        return oid.hex()
    first = min(numbers[0] // 40, 2)
    return ".".join(map(str, [first, numbers[0] - 40 * first, *numbers[1:]]))


def read_file(path: str, why: str) -> bytes:
    """The bytes of the TLS file `path`, which is read again (`why` says when).
    ValueError naming it if it cannot be read, or is not a regular file: a pipe (a named
    one, or bash's <(...)) would block the read until a writer comes, and could be read
    only once."""
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode) and not stat.S_ISDIR(mode):
            raise ValueError(f"{path} is not a regular file (a pipe, a socket or a device): {why}")
        return Path(path).read_bytes()  # a directory: "Is a directory", below
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None


def check_pair(
    cert: str, key: str, cert_pem: bytes, key_pem: bytes, *, server: bool
) -> ssl.SSLContext:
    """ValueError, naming the files and what is wrong, unless `cert` is a PEM certificate
    (chain) and `key` its unencrypted private key (`cert_pem`, `key_pem`: their bytes, as
    read_file read them): checked with the ssl module, which says what is wrong, where
    gRPC would only fail each handshake. Returns the context that loaded them (a
    server's, or a client's)."""
    # OpenSSL says only "PEM lib" of a file without the block it looks for: said here.
    if _CERTIFICATE not in cert_pem:
        raise ValueError(
            f"--tls-cert {cert} holds no PEM certificate (no {_CERTIFICATE.decode()} block)"
        )
    if not _PRIVATE_KEY.search(key_pem):
        raise ValueError(
            f"--tls-key {key} holds no PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ValueError(
            f"--tls-key {key} is encrypted: give the key unencrypted (readable by its user only)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) in _NOT_ITS_KEY:
            raise ValueError(
                f"--tls-key {key} is not the key of the first certificate in --tls-cert "
                f"{cert} (the one presented, which comes before its intermediates)"
            ) from None
        raise ValueError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate chain and its "
            f"private key: {_reason(exc)}"
        ) from None
    return context


def check_cas(path: str, flag: str) -> None:
    """ValueError unless `path` is a PEM file of CA certificates (`flag` names it)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(
            f"{flag} {path} is not a PEM file of CA certificates: {_reason(exc)}"
        ) from None


def _refused_by_clients(server: ssl.SSLContext, cert: str) -> str | None:
    """Why any client refuses the first certificate of `server`'s chain (OpenSSL's words:
    "certificate has expired", "certificate is not yet valid", "unsupported certificate
    purpose"), or None. The ssl module reads no certificate's dates: this is a handshake
    in memory with a client that trusts the certificate file itself."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the names the clients use are not known here
    client.load_verify_locations(cafile=cert)
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate is its own anchor
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    client_side = client.wrap_bio(to_client, to_server)
    for _ in range(4):  # the client sees the certificate in the server's first answer
        try:
            client_side.do_handshake()
            return None
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message if exc.verify_code in _REFUSED_BY_CLIENTS else None
        except ssl.SSLError:
            return None
        try:
            server_side.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            return None
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, ssl.SSLError) and "PEM lib" in str(exc):
        # OpenSSL's only word for a PEM block it could not read whole.
        return "no complete PEM block could be read (a truncated or damaged file?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


__all__ = ["ServerTLS", "check_cas", "check_pair", "read_file"]
