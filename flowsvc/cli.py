"""Command line: `flowsvc serve | run | validate | probe`.

    flowsvc serve [--listen HOST:PORT] [--task-modules a,b] ...   run the gRPC server
    flowsvc run FLOW.json [--input JSON]        run a flow in-process, print the execution
    flowsvc validate FLOW.json                  print the flow's violations
    flowsvc probe [--address HOST:PORT]         health check (the container HEALTHCHECK)

FLOW.json is either a flow (`{"name": ..., "start_task": ..., ...}`) or a request
(`{"flow": {...}, "input": {...}}`).
"""

from __future__ import annotations

import argparse
import asyncio
import decimal
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from flowmanager.v1 import flow_service_pb2 as pb
from google.protobuf import json_format

import flowsvc.grpc_env  # noqa: F401  (before grpc is imported: see its docstring)
from flowsvc import config, convert, logs
from flowsvc.engine import FlowEngine, StopHandle
from flowsvc.errors import FlowsvcError, FlowValidationError, InvalidArgumentError
from flowsvc.executions import CUT_OFF_SECONDS
from flowsvc.models import Event, FlowFinished, FlowStatus
from flowsvc.registry import TaskRegistry
from flowsvc.server import TASK_THREAD_PREFIX, build_server, load_task_modules, package_version
from flowsvc.threads import TaskThreads
from flowsvc.validation import nested_too_deep, too_deep

logger = logging.getLogger("flowsvc.cli")

EXIT_OK, EXIT_FLOW_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

T = TypeVar("T")


#: The longest a probe waits: an hour is past any health check's own timeout.
MAX_PROBE_TIMEOUT = 3600.0


def _probe_timeout(text: str) -> float:
    """`probe --timeout`: seconds gRPC can wait (given NaN, inf, a negative or a huge
    number, it failed at once with DEADLINE_EXCEEDED: a healthy server seemed down)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_PROBE_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_PROBE_TIMEOUT:,.0f}, "
            f"not {text!r}"
        )
    return value


def _add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"flowsvc {package_version()}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowsvc", description="A flow manager over gRPC.")
    _add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    config.add_arguments(serve)

    run = sub.add_parser("run", help="run a flow file in-process and print the execution")
    run.add_argument("flow_file", type=Path, help="flow JSON, or {'flow': ..., 'input': ...}")
    run.add_argument("--input", default=None, help="flow input as a JSON object")
    config.add_arguments(run, config.FLOW_SETTINGS)

    validate = sub.add_parser("validate", help="check a flow file without running it")
    validate.add_argument("flow_file", type=Path)
    config.add_arguments(validate, config.FLOW_SETTINGS)

    probe = sub.add_parser("probe", help="exit 0 when the server's health is SERVING")
    probe.add_argument(
        "--address",
        default=None,
        help="HOST:PORT (default: the port of FLOWSVC_LISTEN, or 50051, on 127.0.0.1)",
    )
    probe.add_argument("--service", default="", help="service name to check ('' = server)")
    probe.add_argument(
        "--timeout",
        type=_probe_timeout,
        default=3.0,
        help=f"seconds to wait for the answer (above 0, at most {MAX_PROBE_TIMEOUT:,.0f})",
    )
    probe.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's CAs (or --tls-ca's)",
    )
    probe.add_argument("--tls-ca", default=None, help="PEM CA certificates to trust (TLS)")
    probe.add_argument(
        "--tls-cert", default=None, help="PEM client certificate, for mutual TLS (TLS)"
    )
    probe.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    probe.add_argument(
        "--tls-server-name",
        default=None,
        help="name the server's certificate must hold (default: the address's host)",
    )
    for command in (serve, run, validate, probe):
        _add_version(command)
    return parser


def _settings(args: argparse.Namespace) -> config.Settings:
    """The server's settings for `serve`; for `run` and `validate`, which run no server,
    only those that shape a flow (a server's bad FLOWSVC_DB does not stop them)."""
    names = None if args.command == "serve" else config.FLOW_SETTINGS
    return config.from_sources(
        {f: getattr(args, f, None) for f in config.Settings.__dataclass_fields__}, names=names
    )


def _json(text: str, what: object) -> Any:
    """`text` parsed as JSON; ValueError naming `what` (the file, or --input) if it is not."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not JSON: {exc}") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise ValueError(f"{what}: nests objects and lists too deeply to read") from None


def _read_request(path: Path, input_json: str | None) -> pb.ExecuteFlowRequest:
    """The file as an ExecuteFlowRequest, through the same JSON mapping grpcurl uses."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:  # UTF-16 (PowerShell's `>`), Latin-1 ...
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start:,}); save it as UTF-8"
        ) from None
    document = _json(text, path)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "flow" not in document:
        document = {"flow": document}
    if input_json is not None:
        document["input"] = _json(input_json, "--input")
    request = pb.ExecuteFlowRequest()
    json_format.ParseDict(document, request)
    return request


def _engine(settings: config.Settings) -> tuple[FlowEngine, TaskThreads]:
    registry = TaskRegistry.with_builtins()
    load_task_modules(settings.task_modules, registry)
    # Sync tasks run in threads named like the server's, so that one left running (timed
    # out, abandoned) is found and not waited for at exit.
    threads = TaskThreads(settings.sync_task_workers, name=TASK_THREAD_PREFIX)
    return FlowEngine(registry, settings.limits, executor=threads), threads


def _print(message: Any) -> None:
    # Field names as in the proto (flow_id, execution_history), and numbers as grpcurl
    # prints them (a Struct holds every number as a double: 3, not 3.0). Text past ASCII
    # as \u escapes, as before: a stdout that cannot encode it (C locale) still prints.
    print(_to_json(json_format.MessageToDict(message, preserving_proto_field_name=True)))


def _to_json(value: Any, indent: str = "") -> str:
    """`value` as JSON indented by 2, as json.dumps(indent=2) but for its floats."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(key)}: {_to_json(v, inner)}" for key, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and value:
        return "[\n" + ",\n".join(inner + _to_json(item, inner) for item in value) + f"\n{indent}]"
    if isinstance(value, float):
        return _number(value)
    return json.dumps(value)


def _number(value: float) -> str:
    """A (finite) double as grpcurl, Go's protojson, prints it: its shortest digits, with
    no exponent from 1e-6 up to 1e21 (3, 0.00001, 1152921504606847000), -0 kept."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    if 1e-6 <= abs(value) < 1e21:
        return format(decimal.Decimal(repr(value)).normalize(), "f")
    mantissa, _, exponent = repr(value).partition("e")  # 1e-07, 1.5e+300
    return f"{mantissa}e{exponent[0]}{exponent[1:].lstrip('0')}"


def _cmd_run(args: argparse.Namespace, settings: config.Settings) -> int:
    engine, threads = _engine(settings)
    request = _read_request(args.flow_file, args.input)
    plan = engine.prepare(convert.request_flow_from_pb(request))
    flow_input = convert.struct_from_pb(request.input, "input")
    if nested_too_deep(flow_input):  # as the server refuses it: a flow tried here runs there
        raise InvalidArgumentError.one("input", too_deep())

    async def collect(stop: StopHandle) -> list[Event]:
        return [ev async for ev in engine.events(plan, flow_input, stop=stop)]

    async def run() -> int:
        # Ctrl-C stops the flow as CancelExecution would, and exits 130 without waiting
        # for a task that ignores it (asyncio.run's own handler only cancels the flow,
        # and such a task would swallow that and let the flow go on).
        interrupted = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
        stop = StopHandle()
        flow = asyncio.ensure_future(collect(stop))
        interrupt = asyncio.ensure_future(interrupted.wait())
        await asyncio.wait({flow, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if not flow.done():
            stop.request("interrupted (Ctrl-C)")
            print("flowsvc: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        else:
            interrupt.cancel()
            events = flow.result()
            # The same conversion as the server's ExecuteFlow: the same JSON as grpcurl shows.
            _print(convert.execute_response_from_events(events[0].flow_id, events))
            final = events[-1]
            succeeded = isinstance(final, FlowFinished) and final.status is FlowStatus.SUCCEEDED
            code = EXIT_OK if succeeded else EXIT_FLOW_FAILED
        threads.shutdown(wait=False)  # idle threads end now: only a stuck one is left to see
        await _leave_tasks_that_ignore_cancellation(code)
        return code

    code = asyncio.run(run())
    _exit_despite_stuck_task_threads(code)
    return code


def _cmd_validate(args: argparse.Namespace, settings: config.Settings) -> int:
    engine, _ = _engine(settings)
    request = _read_request(args.flow_file, None)
    try:
        violations = engine.validate(convert.request_flow_from_pb(request))
    except FlowValidationError as exc:  # params no JSON can hold (NaN): violations too
        violations = list(exc.violations)
    response = convert.violations_to_pb(violations)
    _print(response)
    return EXIT_OK if response.valid else EXIT_FLOW_FAILED


async def _serve(settings: config.Settings) -> float | None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then shut down. Returns the time (monotonic)
    by which what still runs has had its chance to stop, if the grace period ran out."""
    # Signals are handled from the start, so one that arrives while starting still
    # gets a clean shutdown. SIGHUP (its terminal closed) too: by default it ended the
    # process at once, its running flows left to be marked interrupted at the next
    # start; unless it is ignored (nohup), which stays so.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig is signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        loop.add_signal_handler(sig, stop.set)
    server = await build_server(settings)
    _tune_gc()
    # Always printed, whatever the log level: port 0 users learn the real port here.
    if settings.listen.startswith(("unix:", "unix-abstract:")):
        address = settings.listen  # no port: gRPC's answer for one is a count
    else:
        address = f"{settings.listen.rsplit(':', 1)[0]}:{server.port}"
    print(f"flowsvc: serving on {address}", flush=True)
    if server.metrics_endpoint is not None:
        host = settings.metrics_listen.rsplit(":", 1)[0]
        print(
            f"flowsvc: metrics on http://{host}:{server.metrics_endpoint.port}/metrics", flush=True
        )
    await stop.wait()
    await server.shutdown()
    # The flows stopped when the grace period ran out had CUT_OFF_SECONDS from then,
    # their sync tasks' threads too: no new second is counted for them here, so that the
    # process exits about a second after the grace period (the image's 8 s grace must
    # end before docker stop's kill at 10 s), not one second more per kind of straggler.
    stopped = server.flows_stopped_at
    exit_by = None if stopped is None else stopped + CUT_OFF_SECONDS
    await _leave_tasks_that_ignore_cancellation(EXIT_OK, server.manager.left_behind, exit_by)
    return exit_by


async def _leave_tasks_that_ignore_cancellation(
    code: int, known: Collection[asyncio.Task[Any]] = (), exit_by: float | None = None
) -> None:
    """asyncio.run() cancels every task still there and waits for each to end: forever,
    for a task that ignores its cancellation. Their executions are recorded by now (the
    server's shutdown cut them off; `run` has printed its result): log them and exit with
    `code` without waiting. The `known` ones were given their second already; `exit_by`
    (monotonic), when given, is when every other one's second ends too."""
    me = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not me and task not in known]
    for task in left:
        task.cancel()
    stuck: set[asyncio.Task[Any]] = set()
    if left:
        _, stuck = await asyncio.wait(left, timeout=_wait_for_stragglers(exit_by))
    stuck |= {task for task in known if not task.done()}
    if stuck:
        # Leaving now: name the sync tasks' threads still running too, if any.
        threads = _stuck_task_threads(exit_by)
        _leave(
            code,
            "exiting with tasks that ignore cancellation"
            + (" and sync tasks still running" if threads else ""),
            tasks=len(stuck),
            **({"threads": threads} if threads else {}),
        )


#: Allocations between two young-generation collections (CPython's default: 700). Each
#: flow allocates a few hundred objects, nearly all short-lived; measured with
#: scripts/bench-like load (ExecuteFlow, 4x16): 270 -> 247 us of the loop's CPU per call.
GC_YOUNG_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Collect less often, and never again scan what startup made (modules, registry)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def _run_loop(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run `main` on uvloop (measured: +20 % unary, +16 % streaming) or asyncio."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run(main)
    return asyncio.run(main)


#: The least time a task just cancelled gets to end, even past its `exit_by`.
MIN_STRAGGLER_WAIT = 0.1


def _wait_for_stragglers(exit_by: float | None) -> float:
    """Seconds to wait for what was just told to stop: a second, or what is left of it."""
    if exit_by is None:
        return 1.0
    return max(MIN_STRAGGLER_WAIT, exit_by - time.monotonic())


def _stuck_task_threads(exit_by: float | None = None) -> list[str]:
    """The sync-task threads still running a second from now, or at `exit_by` (those of a
    pool shut down end at once when idle). Even past `exit_by` they get a moment,
    MIN_STRAGGLER_WAIT in all: an idle one, just told to stop, was named as running."""
    now = time.monotonic()
    deadline = now + 1.0 if exit_by is None else max(exit_by, now + MIN_STRAGGLER_WAIT)
    stuck = []
    for thread in threading.enumerate():
        if thread.name.startswith(TASK_THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
    return stuck


def _exit_despite_stuck_task_threads(code: int = EXIT_OK, exit_by: float | None = None) -> None:
    """A sync task still running after shutdown cannot be killed, and Python would wait for
    its thread at exit forever: log it and leave without waiting."""
    stuck = _stuck_task_threads(exit_by)
    if stuck:
        _leave(code, "exiting with sync tasks still running", threads=stuck)


def _leave(code: int, why: str, **fields: Any) -> NoReturn:
    """Exit now, without the waits at interpreter exit (for threads, for tasks) that
    would never end: log why, flush what was printed."""
    logger.warning(why, extra=fields)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _local_address() -> str:
    """Where this machine's own server listens: the port of FLOWSVC_LISTEN (the setting a
    container's HEALTHCHECK shares with its server), on loopback when it listens on all
    addresses."""
    listen = config.from_sources({}).listen  # FLOWSVC_LISTEN, checked, or the default
    host, _, port = listen.rpartition(":")
    if host in {"", "[::]", "0.0.0.0", "[::0]"}:  # noqa: S104  (all addresses: probe loopback)
        host = "127.0.0.1"
    return f"{host}:{port}"


def _cmd_probe(args: argparse.Namespace) -> int:
    from flowsvc.probe import check, tls_credentials

    tls_wanted = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name))
    try:
        address = args.address or _local_address()
        tls = tls_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls_wanted else None
    except ValueError as exc:
        print(f"flowsvc: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ok, text = check(address, args.service, args.timeout, tls, args.tls_server_name)
    print(text)
    return EXIT_OK if ok else EXIT_FLOW_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "probe":
        return _cmd_probe(args)
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"flowsvc: bad configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_level if args.command == "serve" else "WARNING")
    if args.command == "serve" and (unknown := config.unknown_variables()):
        # Names only: a value may be a secret meant for something else.
        logs.event(
            logger,
            logging.WARNING,
            "unknown FLOWSVC_ variables ignored",
            variables=list(unknown),
            did_you_mean={name: like for name, like in unknown.items() if like},
        )
    try:
        if args.command == "serve":
            exit_by = _run_loop(_serve(settings), settings.event_loop)
            _exit_despite_stuck_task_threads(EXIT_OK, exit_by)
            return EXIT_OK
        if args.command == "run":
            return _cmd_run(args, settings)
        return _cmd_validate(args, settings)
    except FlowValidationError as exc:
        for v in exc.violations:
            print(f"{v.field}: {v.description}", file=sys.stderr)
        return EXIT_USAGE
    except (FlowsvcError, OSError, ValueError, json_format.ParseError) as exc:
        print(f"flowsvc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C in `run` (serve handles SIGINT as a stop)
        print("flowsvc: interrupted", file=sys.stderr)
        _exit_despite_stuck_task_threads(EXIT_INTERRUPTED)  # a sync task may never return
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
