"""TLS and mutual TLS on the server's port (--tls-cert, --tls-key, --tls-client-ca), the
certificate read again when its files change, and the clients: grpc, grpcurl, the probe.

Every certificate is made here, for the test (a CA, a server certificate for localhost and
127.0.0.1, client certificates), with the cryptography package.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowsvc import config
from flowsvc.config import Settings
from flowsvc.server import FlowServer, build_server
from tests.support import BIN, ROOT, chain, server_process, wait_until

pb = flow_service_pb2
GRPCURL = BIN / "grpcurl"
NOW = datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None
) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class CA:
    """A certificate authority that issues server and client certificates into `folder`."""

    name: str
    folder: Path

    def __post_init__(self) -> None:
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            self._builder(subject, self.key.public_key())
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.folder / f"{self.name}.pem"
        self.pem.write_bytes(_cert_pem(self.cert))

    @staticmethod
    def _builder(
        subject: x509.Name, public_key, since: datetime.datetime = NOW
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(since - datetime.timedelta(hours=1))
            .not_valid_after(since + datetime.timedelta(days=1))
        )

    def issue(
        self,
        name: str,
        *,
        server: bool = True,
        key: ec.EllipticCurvePrivateKey | None = None,
        since: datetime.datetime = NOW,
    ) -> tuple[Path, Path]:
        """A certificate (for localhost and 127.0.0.1 if `server`) and its key (a new P-256
        one unless given): their files. Valid from an hour before `since` to a day after it."""
        key = key or _key()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), since
            )
            .issuer_name(self.cert.subject)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert_path, key_path = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert_path.write_bytes(_cert_pem(builder.sign(self.key, hashes.SHA256())))
        key_path.write_bytes(_key_pem(key))
        return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, CA]:
    return {"ca": CA("ca", tmp_path), "other": CA("other-ca", tmp_path)}


def tls_settings(cert: Path, key: Path, client_ca: Path | None = None) -> Settings:
    return Settings(
        listen="127.0.0.1:0",
        db=":memory:",
        tls_cert=str(cert),
        tls_key=str(key),
        tls_client_ca=str(client_ca or ""),
    )


@asynccontextmanager
async def tls_server(settings: Settings, registry) -> AsyncIterator[FlowServer]:
    server = await build_server(settings, registry)
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


def channel(
    port: int, ca: Path | None, client: tuple[Path, Path] | None = None
) -> grpc.aio.Channel:
    """A channel to 127.0.0.1:`port`: plaintext without `ca`, else TLS trusting `ca` (and
    showing the `client` certificate and key when given)."""
    target = f"127.0.0.1:{port}"
    if ca is None:
        return grpc.aio.insecure_channel(target)
    cert, key = client or (None, None)
    credentials = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(target, credentials)


async def execute(chan: grpc.aio.Channel) -> flow_service_pb2.ExecuteFlowResponse:
    stub = flow_service_pb2_grpc.FlowServiceStub(chan)
    return await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop")), timeout=10)


async def refused(chan: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await execute(chan)
    return info.value


# -- TLS --------------------------------------------------------------------------------


async def test_a_client_that_trusts_the_ca_runs_flows_over_tls(pki, registry) -> None:
    cert, key = pki["ca"].issue("server")
    async with tls_server(tls_settings(cert, key), registry) as server:
        async with channel(server.port, pki["ca"].pem) as chan:
            assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
            health = health_pb2_grpc.HealthStub(chan)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # No plaintext on a TLS port, and no trust in a certificate of another CA.
        async with channel(server.port, None) as chan:
            assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE
        async with channel(server.port, pki["other"].pem) as chan:
            assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_takes_only_clients_with_a_certificate_of_its_ca(pki, registry) -> None:
    cert, key = pki["ca"].issue("server")
    client = pki["ca"].issue("client", server=False)
    stranger = pki["other"].issue("stranger", server=False)
    settings = tls_settings(cert, key, client_ca=pki["ca"].pem)
    async with tls_server(settings, registry) as server:
        async with channel(server.port, pki["ca"].pem, client) as chan:
            assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
        for shown in (None, stranger):
            async with channel(server.port, pki["ca"].pem, shown) as chan:
                assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE, shown


async def test_a_renewed_certificate_is_served_to_new_connections(pki, registry, caplog) -> None:
    """The certificate's files replaced (as cert-manager or a renewal job does): new
    connections get the new certificate, without a restart, and a connection already open
    keeps working. A replacement that does not check out (a key of another certificate) is
    logged, and the certificate in use stays."""
    caplog.set_level(logging.INFO, logger="flowsvc.tls")
    cert, key = pki["ca"].issue("server")
    async with tls_server(tls_settings(cert, key), registry) as server:
        async with channel(server.port, pki["ca"].pem) as before:
            await execute(before)

            # A bad renewal: the new certificate, with the old key.
            new_cert, new_key = pki["other"].issue("renewed")
            os.replace(new_cert, cert)
            async with channel(server.port, pki["ca"].pem) as chan:
                assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
            taken = [r for r in caplog.records if "not taken" in r.getMessage()]
            assert len(taken) == 1, caplog.text

            # Its key arrives: the pair checks out and is served.
            os.replace(new_key, key)
            async with channel(server.port, pki["other"].pem) as chan:
                assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
            async with channel(server.port, pki["ca"].pem) as chan:
                assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE
            assert any("reloaded" in r.getMessage() for r in caplog.records), caplog.text

            # The connection made before the renewal goes on with its session.
            assert (await execute(before)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert len([r for r in caplog.records if "not taken" in r.getMessage()]) == 1


async def test_a_renewal_with_a_key_grpc_cannot_serve_with_is_not_taken(
    pki, registry, caplog
) -> None:
    """A renewed certificate of a key that OpenSSL takes and gRPC's TLS does not (Ed448):
    logged as not taken, and the certificate in use stays; never "reloaded" while gRPC
    keeps the old one."""
    caplog.set_level(logging.INFO, logger="flowsvc.tls")
    cert, key = pki["ca"].issue("server")
    async with tls_server(tls_settings(cert, key), registry) as server:
        odd_cert, odd_key = pki["other"].issue("odd", key=ed448.Ed448PrivateKey.generate())
        os.replace(odd_key, key)
        os.replace(odd_cert, cert)
        async with channel(server.port, pki["ca"].pem) as chan:
            assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert not any("reloaded" in r.getMessage() for r in caplog.records), caplog.text
        (taken,) = [r for r in caplog.records if "not taken" in r.getMessage()]
        assert "an Ed448 key" in getattr(taken, "error", ""), caplog.text


async def test_a_renewal_the_server_could_not_read_is_taken_once_it_can(
    pki, registry, caplog, monkeypatch
) -> None:
    """A renewal job that writes the key unreadable by the server's user (root's, mode
    0600) is refused; once the operator fixes it (chown, chmod: only the file's status
    change time moves), new connections get the new certificate without a restart."""
    caplog.set_level(logging.INFO, logger="flowsvc.tls")
    read_bytes = Path.read_bytes

    def as_another_user(path: Path) -> bytes:
        # The tests may run as root, who reads any file: a file of mode 0 stands for one
        # the server's user may not read.
        if path.stat().st_mode & 0o777 == 0:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", as_another_user)
    cert, key = pki["ca"].issue("server")
    async with tls_server(tls_settings(cert, key), registry) as server:
        new_cert, new_key = pki["other"].issue("renewed")
        new_key.chmod(0)
        os.replace(new_cert, cert)
        os.replace(new_key, key)
        async with channel(server.port, pki["other"].pem) as chan:
            assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE
        errors = [getattr(r, "error", "") for r in caplog.records]
        assert any("Permission denied" in error for error in errors), errors

        changed = key.stat().st_ctime_ns
        # The file system's clock ticks coarsely: chmod until the status change time moves.
        wait_until(lambda: key.chmod(0o600) or key.stat().st_ctime_ns != changed)
        async with channel(server.port, pki["other"].pem) as chan:
            assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
        assert any("reloaded" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize(
    ("issued", "reason"),
    [
        ({"since": NOW - datetime.timedelta(days=3)}, "certificate has expired"),
        ({"since": NOW + datetime.timedelta(days=3)}, "certificate is not yet valid"),
        ({"server": False}, "unsuitable certificate purpose"),  # a client's certificate
    ],
)
async def test_a_certificate_every_client_refuses_is_logged(
    pki, registry, caplog, issued, reason
) -> None:
    """Served all the same (the server's clock may be wrong), but said: every handshake
    fails on the client's side, where the server sees nothing."""
    caplog.set_level(logging.INFO, logger="flowsvc.tls")
    cert, key = pki["ca"].issue("server", **issued)
    async with tls_server(tls_settings(cert, key), registry) as server:
        (warned,) = [r for r in caplog.records if r.getMessage().startswith("clients will refuse")]
        assert (warned.levelno, warned.reason, warned.cert) == (logging.WARNING, reason, str(cert))
        async with channel(server.port, pki["ca"].pem) as chan:
            assert (await refused(chan)).code() == grpc.StatusCode.UNAVAILABLE

        # Renewed with a good one: taken, and nothing more to say.
        good_cert, good_key = pki["ca"].issue("renewed")
        os.replace(good_key, key)
        os.replace(good_cert, cert)
        async with channel(server.port, pki["ca"].pem) as chan:
            assert (await execute(chan)).status == flow_pb2.FLOW_STATUS_SUCCEEDED
    assert len([r for r in caplog.records if "clients will refuse" in r.getMessage()]) == 1


# -- settings and start-up errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"FLOWSVC_TLS_CERT": "c.pem"}, "--tls-cert / FLOWSVC_TLS_CERT needs --tls-key"),
        ({"FLOWSVC_TLS_KEY": "k.pem"}, "--tls-key / FLOWSVC_TLS_KEY needs --tls-cert"),
        ({"FLOWSVC_TLS_CLIENT_CA": "ca.pem"}, "needs --tls-cert and --tls-key"),
    ],
)
def test_tls_settings_that_do_not_go_together_are_refused(variables, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        config.from_sources({}, variables)


def test_blank_tls_variables_leave_tls_off() -> None:
    found = config.from_sources({}, {"FLOWSVC_TLS_CERT": "", "FLOWSVC_TLS_KEY": " "})
    assert (found.tls_cert, found.tls_key, found.tls_client_ca) == ("", "", "")


def _bad_files(tmp_path: Path, pki: dict[str, CA], case: str) -> tuple[Settings, str]:
    """Settings with one thing wrong in their TLS files, and what the refusal must say."""
    cert, key = pki["ca"].issue("server")
    if case == "missing":
        return tls_settings(tmp_path / "nope.pem", key), "cannot read"
    if case == "not a certificate":
        junk = tmp_path / "junk.pem"
        junk.write_text("not a certificate\n")
        return tls_settings(junk, key), f"--tls-cert {junk} holds no PEM certificate"
    if case == "no key in the key file":
        return tls_settings(cert, cert), f"--tls-key {cert} holds no PEM private key"
    if case == "key of another certificate":
        _, other_key = pki["other"].issue("other")
        return tls_settings(cert, other_key), f"--tls-key {other_key} is not the key of the"
    if case == "key of another type":
        rsa_key = tmp_path / "rsa.key"
        rsa_key.write_bytes(_key_pem(rsa.generate_private_key(65537, 2048)))
        return tls_settings(cert, rsa_key), f"--tls-key {rsa_key} is not the key of the"
    if case == "key gRPC cannot serve with":
        # OpenSSL takes a brainpool key, gRPC's TLS (BoringSSL) does not.
        return (
            tls_settings(*pki["ca"].issue("bp", key=ec.generate_private_key(ec.BrainpoolP256R1()))),
            "holds an EC key on curve 1.3.36.3.3.2.8.1.1.7, which gRPC's TLS does not serve",
        )
    if case == "truncated certificate":
        truncated = tmp_path / "truncated.pem"
        truncated.write_bytes(cert.read_bytes()[:200])
        return tls_settings(truncated, key), "no complete PEM block could be read"
    if case == "encrypted key":
        encrypted = tmp_path / "encrypted.key"
        encrypted.write_bytes(_key_pem(_key(), password=b"secret"))
        return tls_settings(cert, encrypted), "is encrypted"
    junk = tmp_path / "junk-ca.pem"
    junk.write_text("no CA here\n")
    return tls_settings(cert, key, client_ca=junk), "is not a PEM file of CA certificates"


CASES = [
    "missing",
    "not a certificate",
    "no key in the key file",
    "key of another certificate",
    "truncated certificate",
    "key of another type",
    "encrypted key",
    "key gRPC cannot serve with",
    "client CA not a certificate",
]


@pytest.mark.parametrize("case", CASES)
async def test_bad_tls_files_refuse_to_start_saying_which(tmp_path, pki, registry, case) -> None:
    settings, message = _bad_files(tmp_path, pki, case)
    with pytest.raises(ValueError, match=re.escape(message)):
        await build_server(settings, registry)


def test_flowsvc_serve_with_a_bad_key_exits_with_the_reason(tmp_path, pki) -> None:
    settings, message = _bad_files(tmp_path, pki, "key of another certificate")
    result = subprocess.run(
        [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0", "--db", ":memory:"],
        env={
            **os.environ,
            "FLOWSVC_TLS_CERT": settings.tls_cert,
            "FLOWSVC_TLS_KEY": settings.tls_key,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pipe_for_a_tls_file_refuses_to_start_instead_of_hanging(tmp_path, pki) -> None:
    """A named pipe (or bash's <(...)) has no writer: reading it blocked the server's
    start for ever, deaf to SIGTERM."""
    cert, _ = pki["ca"].issue("server")
    pipe = tmp_path / "key.pipe"
    os.mkfifo(pipe)
    argv = [sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0", "--db", ":memory:"]
    result = subprocess.run(
        [*argv, "--tls-cert", str(cert), "--tls-key", str(pipe)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"{pipe} is not a regular file" in result.stderr


# -- grpcurl and the probe, against `flowsvc serve` ------------------------------------


@pytest.fixture
def mutual_server(tmp_path, pki) -> Iterator[tuple[dict[str, Path], int]]:
    """A `flowsvc serve` with mutual TLS, and the files a client needs."""
    cert, key = pki["ca"].issue("server")
    client_cert, client_key = pki["ca"].issue("client", server=False)
    args = ("--db", ":memory:", "--tls-cert", str(cert), "--tls-key", str(key))
    args += ("--tls-client-ca", str(pki["ca"].pem))
    with server_process(tmp_path, *args) as server:
        # Log lines are written in batches: polled for.
        (started,) = wait_until(
            lambda: [line for line in server.log_lines() if line.get("msg") == "server started"]
        )
        assert started["tls"] == "mutual", started
        yield {"ca": pki["ca"].pem, "cert": client_cert, "key": client_key}, server.port


@pytest.mark.parametrize("verbosity", [None, "", " "])
def test_failed_handshakes_leave_the_log_json(tmp_path, pki, monkeypatch, verbosity) -> None:
    """A plaintext client on the TLS port (a probe, a scanner): gRPC's C core logged a line
    of its own format on stderr for each failed handshake, among the server's JSON lines.
    A blank GRPC_VERBOSITY (a Compose or Helm value left empty) is no verbosity either:
    gRPC took it for its default, and logged the handshakes again."""
    if verbosity is None:
        monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    else:
        monkeypatch.setenv("GRPC_VERBOSITY", verbosity)
    cert, key = pki["ca"].issue("server")
    args = ("--db", ":memory:", "--tls-cert", str(cert), "--tls-key", str(key))
    with server_process(tmp_path, *args) as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
                plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                while plain.recv(4096):  # until the server closes the connection
                    pass
        probed = subprocess.run(
            [sys.executable, "-m", "flowsvc", "probe", "--address", server.address],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probed.returncode == 1, probed
        wait_until(lambda: any(line.get("msg") == "server started" for line in server.log_lines()))
    lines = server.log_path.read_text().splitlines()
    assert [line for line in lines if not line.startswith("{")] == [
        f"flowsvc: serving on 127.0.0.1:{server.port}"
    ], lines


#: The README's command, verbatim (HOST:PORT: the server's address); run in the folder of
#: the certificates, which have the README's names.
GRPCURL_MUTUAL_LIST = "grpcurl -cacert ca.pem -cert client.pem -key client.key HOST:PORT list"


def test_grpcurl_over_mutual_tls(mutual_server) -> None:
    files, port = mutual_server
    argv = shlex.split(GRPCURL_MUTUAL_LIST.replace("HOST:PORT", f"localhost:{port}"))
    readme = subprocess.run(
        [str(GRPCURL), *argv[1:]],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=files["ca"].parent,
    )
    assert b"flowmanager.v1.FlowService" in readme.stdout, readme.stderr.decode()
    flow = json.dumps({"flow": _noop_flow()})
    base = [str(GRPCURL), "-cacert", str(files["ca"])]
    mutual = [*base, "-cert", str(files["cert"]), "-key", str(files["key"])]
    address = f"localhost:{port}"
    method = "flowmanager.v1.FlowService/ExecuteFlow"
    ran = subprocess.run(
        [*mutual, "-d", flow, address, method], capture_output=True, timeout=60, check=False
    )
    assert ran.returncode == 0, ran.stderr.decode()
    assert json.loads(ran.stdout)["status"] == "FLOW_STATUS_SUCCEEDED"
    # Without a client certificate the handshake fails: nothing is answered.
    alone = subprocess.run(
        [*base, "-d", flow, address, method], capture_output=True, timeout=60, check=False
    )
    assert alone.returncode != 0 and b"FLOW_STATUS" not in alone.stdout


def _noop_flow() -> dict:
    return {
        "name": "tls",
        "startTask": "noop",
        "tasks": [{"name": "noop"}],
    }


def test_the_probe_checks_health_over_mutual_tls(mutual_server) -> None:
    files, port = mutual_server

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flowsvc", "probe", "--address", f"127.0.0.1:{port}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )

    client = ("--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]))
    ok = probe("--tls-ca", str(files["ca"]), *client)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING"), ok.stderr
    named = probe("--tls-ca", str(files["ca"]), "--tls-server-name", "localhost", *client)
    assert named.returncode == 0, named.stdout + named.stderr
    for args in ((), ("--tls-ca", str(files["ca"]))):  # plaintext; TLS without a certificate
        failed = probe(*args)
        assert failed.returncode == 1 and "UNAVAILABLE" in failed.stdout, (args, failed)
    half = probe("--tls-ca", str(files["ca"]), "--tls-cert", str(files["cert"]))
    assert half.returncode == 2 and "go together" in half.stderr
    # A file of the probe's own that is no certificate: a bad configuration (exit 2,
    # naming it), not a server reported unhealthy.
    junk = files["ca"].parent / "junk.pem"
    junk.write_text("not a certificate\n")
    for args in (
        ("--tls-ca", str(junk)),
        ("--tls-cert", str(junk), "--tls-key", str(files["key"])),
    ):
        bad = probe(*args)
        assert bad.returncode == 2 and str(junk) in bad.stderr, (args, bad)


def test_an_algorithm_identifier_that_is_no_oid_is_named_by_its_bytes() -> None:
    """White-box: the DER reader names a key's algorithm from its OID; bytes that never end
    an OID (every one 0x80 or more) raised IndexError (p57), now shown as they are."""
    from flowsvc.tls import _dotted

    assert _dotted(bytes.fromhex("2b6571")) == "1.3.101.113"  # Ed448
    assert _dotted(bytes.fromhex("8182")) == "8182"
    assert _dotted(None) == "(not named: explicit parameters)"


def test_a_pipe_for_a_probe_tls_file_is_a_bad_configuration(tmp_path, pki) -> None:
    """The probe reads its files twice (checked, then given to gRPC): a named pipe with no
    writer hung it past its --timeout, and bash's <(cat ca.pem) was read whole once, then
    found empty and called 'not a PEM file of CA certificates'."""
    pipe = tmp_path / "ca.pipe"
    os.mkfifo(pipe)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsvc",
            "probe",
            "--address",
            "127.0.0.1:1",
            "--tls-ca",
            str(pipe),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert f"{pipe} is not a regular file" in result.stderr
