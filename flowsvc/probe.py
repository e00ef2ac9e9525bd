"""A tiny grpc.health.v1 client: the container's HEALTHCHECK (`flowsvc probe`).

grpc_health_probe cannot be fetched on our machines, so the image carries this.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowsvc.tls import check_cas, check_pair, read_file


def tls_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: trusting the CAs of file `ca` (None: the system's), and showing
    the client certificate `cert` with its `key` when given (mutual TLS). ValueError
    naming a file that cannot be read or is not what it should be (a CA file without a
    certificate, a key of another certificate), or a certificate without its key."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together (a certificate and its key)")

    def read(path: str | None) -> bytes | None:
        # The CA file is read again by check_cas: a pipe is refused, not read twice.
        return read_file(path, "the probe checks it, then gives it to gRPC") if path else None

    ca_pem, key_pem, cert_pem = read(ca), read(key), read(cert)
    # Checked here (gRPC would only fail the handshake, "Failed to create security
    # handshaker", and the probe would call the server unhealthy for a file of its own).
    if ca:
        check_cas(ca, "--tls-ca")
    if cert and key and cert_pem is not None and key_pem is not None:
        check_pair(cert, key, cert_pem, key_pem, server=False)
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    tls: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> tuple[bool, str]:
    """(True, "SERVING") when `address` reports `service` SERVING within `timeout` seconds;
    over TLS with `tls`, checking the certificate against `server_name` if given (else
    the address's host)."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    try:
        with (
            grpc.insecure_channel(address)
            if tls is None
            else grpc.secure_channel(address, tls, options=options)
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, name
