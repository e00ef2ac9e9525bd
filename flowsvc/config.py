"""Server settings: one frozen object, from flags and FLOWSVC_* environment variables.

Every setting has a flag and an environment variable of the same name
(`--max-steps-cap` / `FLOWSVC_MAX_STEPS_CAP`). A flag wins over the variable,
the variable over the default.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from typing import Any

from flowsvc.executions import RECORD_RESERVE_BYTES
from flowsvc.validation import Limits

ENV_PREFIX = "FLOWSVC_"


def _modules(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


#: Bounds beyond which a value breaks what it is handed to (a C int in gRPC's channel
#: options or SQLite's pragmas, a date before year 1, an event loop's timer), or past
#: which it cannot matter (a flow's max_steps and max_attempts are uint32 fields).
C_INT_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
MAX_SECONDS = 1e9  # about 31 years
MAX_RETENTION_SECONDS = 100 * 365.25 * 86400.0  # 100 years
MAX_IN_FLIGHT = 1_000_000
#: Each is an OS thread, and as many spares again may be started (see threads.py): 20,000
#: threads stay under the smallest common pid_max (32,768).
MAX_SYNC_TASK_WORKERS = 10_000
#: SQLite's largest database: 4,294,967,294 pages of 64 KiB (about 281 TB).
MAX_DB_BYTES = 4_294_967_294 * 65_536
#: The least --max-response-bytes but 0 (no limit): an answer keeps RECORD_RESERVE_BYTES
#: (1 KiB) for the execution's own fields, so under twice that hardly a flow fits, and at
#: 1 KiB or less none: the server would start and refuse every flow.
MIN_RESPONSE_BYTES = 2 * RECORD_RESERVE_BYTES


class _Integer:
    """A parser of whole numbers from `low` to `high`, or 0 too (`or_zero`: "no limit");
    its error and --help state the range."""

    def __init__(self, low: int, high: int, *, or_zero: bool = False) -> None:
        self.low, self.high, self.or_zero = low, high, or_zero
        self.range = f"{'0, or ' if or_zero else ''}{low:,} to {high:,}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not (self.low <= value <= self.high or (self.or_zero and value == 0)):
            zero = "0 or " if self.or_zero else ""
            raise ValueError(
                f"must be {zero}an integer at least {self.low:,} and at most {self.high:,}, "
                f"not {text.strip()!r}"
            )
        return value


class _Seconds:
    """A parser of seconds up to `high`, from 0 (`zero`) or above it; its error and
    --help state the range."""

    def __init__(self, high: float, *, zero: bool) -> None:
        self.high, self.zero = high, zero
        self.range = f"{'0' if zero else 'above 0,'} to {high:,.0f} seconds"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # float() takes "nan" and "inf" too: neither is in any range.
        if not ((value >= 0 if self.zero else value > 0) and value <= self.high):
            least = "at least 0" if self.zero else "above 0"
            raise ValueError(
                f"must be a number of seconds {least} and at most {self.high:,.0f}, "
                f"not {text.strip()!r}"
            )
        return value


def _listen(text: str) -> str:
    """host:port with a port from 0 to 65535 (gRPC would silently wrap a larger one);
    unix: and unix-abstract: addresses are passed through."""
    if text.startswith(("unix:", "unix-abstract:")):
        if not text.partition(":")[2]:
            # gRPC takes it, and listens on a nameless abstract socket no client can reach.
            raise ValueError(f"must name the socket after {text!r} (unix:/run/flowsvc.sock)")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port, not {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        # gRPC reads ::1:50051 as some other address and fails with no reason given.
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}, not {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, not {port!r}")
    return text


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _optional_listen(text: str) -> str:
    """host:port as for --listen (no unix socket: a scraper speaks TCP), or empty: off."""
    if not text.strip():
        return ""
    if text.startswith(("unix:", "unix-abstract:")):
        raise ValueError(f"must be host:port (a scraper connects over TCP), not {text!r}")
    return _listen(text)


def _optional_file(text: str) -> str:
    """A file's path, or empty (blank) for none: a chart's empty default turns it off."""
    return text if text.strip() else ""


def _synchronous(text: str) -> str:
    value = text.upper()
    if value not in {"FULL", "NORMAL"}:
        raise ValueError("must be FULL or NORMAL")
    return value


def _event_loop(text: str) -> str:
    value = text.lower()
    if value not in {"auto", "uvloop", "asyncio"}:
        raise ValueError("must be auto, uvloop or asyncio")
    return value


#: The log levels, and the other names operators write for them (Python's logging takes
#: WARN and FATAL too), in any case.
LOG_LEVELS = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARNING",
    "WARN": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
    "FATAL": "CRITICAL",
}


def _log_level(text: str) -> str:
    level = LOG_LEVELS.get(text.strip().upper())
    if level is None:
        raise ValueError(
            "must be one of DEBUG, INFO, WARNING (or WARN), ERROR, CRITICAL (or FATAL), in any case"
        )
    return level


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a server is configured with."""

    #: Address to listen on, host:port; port 0 picks a free port.
    listen: str = "[::]:50051"
    #: Python modules imported at start, so their @register_task tasks are available.
    task_modules: tuple[str, ...] = ()
    #: Log level of the JSON log lines on stderr.
    log_level: str = "INFO"
    #: max_steps of a flow that leaves it at 0.
    default_max_steps: int = 1000
    #: Largest max_steps a flow may ask for.
    max_steps_cap: int = 100_000
    #: Most tasks a flow may declare.
    max_tasks: int = 1000
    #: Seconds running flows get to finish after SIGTERM/SIGINT.
    grace_seconds: float = 10.0
    #: Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Largest answer carrying a whole execution (ExecuteFlow, GetExecution,
    #: CancelExecution); 0: no limit. gRPC clients accept 4 MiB by default.
    max_response_bytes: int = 4 * 1024 * 1024
    #: Threads that run sync (def) tasks.
    sync_task_workers: int = 32
    #: The event loop: "uvloop", "asyncio", or "auto" (uvloop when installed).
    event_loop: str = "auto"
    #: Longest timeout a task may ask for, in seconds.
    max_task_timeout_seconds: float = 3600.0
    #: Longest timeout a flow may ask for, in seconds.
    max_flow_timeout_seconds: float = 86400.0
    #: Most attempts a retry policy may ask for.
    max_attempts: int = 10
    #: Longest backoff a retry policy may ask for, in seconds.
    max_backoff_seconds: float = 3600.0
    #: SQLite file of the execution store (":memory:" keeps nothing across restarts).
    db: str = "flowsvc.db"
    #: SQLite synchronous mode: FULL survives power loss, NORMAL a process crash.
    db_synchronous: str = "FULL"
    #: How long a write waits for a locked database before failing UNAVAILABLE.
    db_busy_timeout_ms: int = 5000
    #: Largest the database may grow, in bytes (0: no cap); past it writes fail UNAVAILABLE.
    db_max_bytes: int = 0
    #: Most executions running at once; more get RESOURCE_EXHAUSTED.
    max_in_flight: int = 1000
    #: Finished executions older than this many seconds are deleted (0: keep forever).
    retention_seconds: float = 7 * 24 * 3600.0
    #: host:port of the Prometheus metrics endpoint (GET /metrics); empty: none.
    metrics_listen: str = ""
    #: PEM file of the server's certificate chain: with tls_key, the port speaks TLS.
    tls_cert: str = ""
    #: PEM file of the certificate's private key (unencrypted).
    tls_key: str = ""
    #: PEM file of the CAs that sign client certificates: set, every client must present
    #: one (mutual TLS).
    tls_client_ca: str = ""

    @property
    def limits(self) -> Limits:
        return Limits(
            default_max_steps=self.default_max_steps,
            max_steps_cap=self.max_steps_cap,
            max_tasks=self.max_tasks,
            max_task_timeout_s=self.max_task_timeout_seconds,
            max_flow_timeout_s=self.max_flow_timeout_seconds,
            max_attempts=self.max_attempts,
            max_backoff_s=self.max_backoff_seconds,
        )


_PARSERS: dict[str, Callable[[str], Any]] = {
    "listen": _listen,
    "task_modules": _modules,
    "log_level": _log_level,
    "default_max_steps": _Integer(1, UINT32_MAX),
    "max_steps_cap": _Integer(1, UINT32_MAX),
    "max_tasks": _Integer(1, C_INT_MAX),
    "grace_seconds": _Seconds(MAX_SECONDS, zero=True),
    "max_message_bytes": _Integer(1, C_INT_MAX),
    "max_response_bytes": _Integer(MIN_RESPONSE_BYTES, C_INT_MAX, or_zero=True),
    "sync_task_workers": _Integer(1, MAX_SYNC_TASK_WORKERS),
    "event_loop": _event_loop,
    "max_task_timeout_seconds": _Seconds(MAX_SECONDS, zero=False),
    "max_flow_timeout_seconds": _Seconds(MAX_SECONDS, zero=False),
    "max_attempts": _Integer(1, UINT32_MAX),
    "max_backoff_seconds": _Seconds(MAX_SECONDS, zero=True),
    "db": _non_empty,
    "db_synchronous": _synchronous,
    "db_busy_timeout_ms": _Integer(0, C_INT_MAX),
    "db_max_bytes": _Integer(0, MAX_DB_BYTES),
    "max_in_flight": _Integer(1, MAX_IN_FLIGHT),
    "retention_seconds": _Seconds(MAX_RETENTION_SECONDS, zero=True),
    "metrics_listen": _optional_listen,
    "tls_cert": _optional_file,
    "tls_key": _optional_file,
    "tls_client_ca": _optional_file,
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


#: The settings that shape a flow run in-process (`flowsvc run`, `flowsvc validate`): the
#: others configure a server (its address, store, shutdown, limits on calls).
FLOW_SETTINGS = frozenset(
    {
        "task_modules",
        "default_max_steps",
        "max_steps_cap",
        "max_tasks",
        "sync_task_workers",
        "max_task_timeout_seconds",
        "max_flow_timeout_seconds",
        "max_attempts",
        "max_backoff_seconds",
    }
)


def add_arguments(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """Add one flag per setting (of those in `names`, if given); defaults stay None so the
    environment can fill in."""
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        doc = _FIELD_DOCS.get(f.name, "")
        # A list setting's default as its variable would be written; "none" when empty.
        default = (
            (",".join(f.default) or "none") if isinstance(f.default, tuple) else repr(f.default)
        )
        parse = _PARSERS[f.name]
        bounds = f"; {parse.range}" if isinstance(parse, _Integer | _Seconds) else ""
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{doc} (env {env_name(f.name)}, default {default}{bounds})",
        )


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The FLOWSVC_* variables that name no setting (a typo is otherwise silently ignored),
    each with the setting's variable it most looks like, if any."""
    environ = os.environ if environ is None else environ
    known = {f.name.upper(): env_name(f.name) for f in fields(Settings)}
    unknown: dict[str, str | None] = {}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known.values():
            short = name.removeprefix(ENV_PREFIX)
            if short in _MEANT:
                unknown[name] = env_name(_MEANT[short])
                continue
            # Compared without the prefix, which every name shares and would make alike.
            like = difflib.get_close_matches(short, known, n=1, cutoff=0.8)
            unknown[name] = known[like[0]] if like else None
    return unknown


#: Names a setting is likely written as that spelling does not find: FLOWSVC_TLS_CA reads
#: as the probe's --tls-ca, and difflib finds TLS_CERT closer than TLS_CLIENT_CA. Left
#: unsaid, the server ran TLS without the mutual TLS its operator meant.
_MEANT = {"TLS_CA": "tls_client_ca"}


def from_sources(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str] | None = None,
    names: Collection[str] | None = None,
) -> Settings:
    """Settings from flags, then FLOWSVC_* variables, then defaults; only those in
    `names`, if given, are read (the others keep their defaults).

    Raises ValueError naming the flag or variable whose value is bad.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        raw = flags.get(f.name)
        source = flag_name(f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
            source = env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = _PARSERS[f.name](raw)
        except ValueError as exc:
            raise ValueError(f"{source}={raw!r}: {exc}") from None
    settings = Settings(**values)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        given, missing = ("tls_cert", "tls_key") if settings.tls_cert else ("tls_key", "tls_cert")
        raise ValueError(
            f"{flag_name(given)} / {env_name(given)} needs {flag_name(missing)} / "
            f"{env_name(missing)} too (a certificate and its private key)"
        )
    if settings.tls_client_ca and not settings.tls_cert:
        raise ValueError(
            f"{flag_name('tls_client_ca')} / {env_name('tls_client_ca')} needs "
            f"{flag_name('tls_cert')} and {flag_name('tls_key')}: clients are asked for a "
            "certificate only over TLS"
        )
    if settings.default_max_steps > settings.max_steps_cap:
        raise ValueError(
            f"{flag_name('default_max_steps')} / {env_name('default_max_steps')} "
            f"({settings.default_max_steps}) must not be over {flag_name('max_steps_cap')} / "
            f"{env_name('max_steps_cap')} ({settings.max_steps_cap})"
        )
    return settings


_FIELD_DOCS = {
    "listen": "address to listen on, host:port (port 0 picks a free one)",
    "task_modules": "comma-separated Python modules to import for their tasks",
    "log_level": "DEBUG, INFO, WARNING (or WARN), ERROR or CRITICAL (or FATAL); any case",
    "default_max_steps": "max_steps for flows that leave it at 0",
    "max_steps_cap": "largest max_steps a flow may ask for",
    "max_tasks": "most tasks one flow may declare",
    "grace_seconds": "seconds running flows get on SIGTERM, SIGINT or SIGHUP",
    "max_message_bytes": "largest request accepted, in bytes",
    "max_response_bytes": (
        "largest answer carrying a whole execution, in bytes; a larger one is "
        "RESOURCE_EXHAUSTED, naming the execution (0: no limit)"
    ),
    "sync_task_workers": "threads running sync (def) tasks",
    "event_loop": "auto (uvloop when installed), uvloop or asyncio",
    "max_task_timeout_seconds": "longest timeout a task may ask for",
    "max_flow_timeout_seconds": "longest timeout a flow may ask for",
    "max_attempts": "most attempts a retry policy may ask for",
    "max_backoff_seconds": "longest backoff a retry policy may ask for",
    "db": "SQLite file of the execution store, or :memory:",
    "db_synchronous": "FULL (survives power loss) or NORMAL (survives a process crash)",
    "db_busy_timeout_ms": "how long a write waits for a locked database",
    "db_max_bytes": "largest the database may grow (0: no cap)",
    "max_in_flight": "most executions running at once",
    "retention_seconds": "delete finished executions older than this (0: never)",
    "metrics_listen": "host:port for Prometheus metrics, GET /metrics (empty: none)",
    "tls_cert": "PEM certificate chain: with --tls-key, the port speaks TLS (reread when changed)",
    "tls_key": "PEM private key of --tls-cert, unencrypted",
    "tls_client_ca": "PEM CA certificates: set, clients must present a certificate they signed",
}
