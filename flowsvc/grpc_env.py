"""gRPC's C core logs on stderr by itself, in its own format: a line such as `I1126
08:35:59 ssl_transport_security.cc:2563] Handshake failed ...` for every failed TLS
handshake (a plaintext client, a port scanner, a client of another CA), in among the
server's JSON lines. The core reads GRPC_VERBOSITY once, when grpc is imported: the
command line imports this module before anything that imports grpc, so that only the
core's errors reach stderr, unless GRPC_VERBOSITY is set (a blank one, as a Compose or
Helm value left empty gives, is not: gRPC takes it for its own default, which logs them).
It is set in the process's environment, so processes that tasks start inherit it.
"""

from __future__ import annotations

import os

if not os.environ.get("GRPC_VERBOSITY", "").strip():
    os.environ["GRPC_VERBOSITY"] = "ERROR"
