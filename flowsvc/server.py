"""Build and run the gRPC server: FlowService, health and reflection.

    server = await build_server(settings)   # bound, started
    ...
    await server.shutdown()                  # health NOT_SERVING, drain, stop

Shutdown: health turns NOT_SERVING at once for "" and FlowService; new flows
get UNAVAILABLE; running flows get `grace_seconds` to finish; then the gRPC
server stops and cancels whatever still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.resources
import inspect
import logging
import os
import socket
import time
import types
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import grpc
from flowmanager.v1 import flow_service_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from flowsvc import convert
from flowsvc.config import Settings
from flowsvc.engine import FlowEngine
from flowsvc.errors import (
    NotFoundError,
    ShuttingDownError,
    StoreUnavailableError,
    TaskModuleError,
    UnknownMethodError,
)
from flowsvc.executions import CUT_OFF_SECONDS, ExecutionManager, ManagerSettings
from flowsvc.logs import event as log_event
from flowsvc.metrics import Metrics, MetricsEndpoint
from flowsvc.registry import TaskRegistry, default_registry
from flowsvc.servicer import (
    FlowServicer,
    MalformedRequest,
    abort_malformed,
    abort_with,
    safe_deserializer,
)
from flowsvc.stalls import StallWatch
from flowsvc.store import ExecutionStore
from flowsvc.store.memory import MemoryStore
from flowsvc.store.sqlite import SQLiteStore
from flowsvc.tasks import http as http_task
from flowsvc.threads import TaskThreads
from flowsvc.tls import ServerTLS

logger = logging.getLogger("flowsvc.server")

SERVICE = flow_service_pb2.DESCRIPTOR.services_by_name["FlowService"]
SERVICE_NAME = SERVICE.full_name
#: The --db value that keeps executions in memory only (MemoryStore).
MEMORY = ":memory:"
#: How long RPCs get to send their last messages once every flow has ended: at most this,
#: and no more than what is left of the grace period and its cut-off second, but at least
#: FINAL_RPC_MIN_SECONDS.
FINAL_RPC_GRACE_SECONDS = 2.0
FINAL_RPC_MIN_SECONDS = 0.5
#: Before it stops listening, a draining server answers the calls still coming
#: (UNAVAILABLE: retry on another instance) until none has come for SETTLE_QUIET_SECONDS,
#: at most SETTLE_MAX_SECONDS: gRPC cancels the calls it holds unanswered when the server
#: stops (CANCELLED, which clients do not retry). A burst at SIGTERM had 117 calls of
#: 5,158 end CANCELLED without it, none with it (clients backing off 50 ms on UNAVAILABLE).
SETTLE_QUIET_SECONDS = 0.1
SETTLE_MAX_SECONDS = 1.0
#: The shortest keepalive interval accepted from clients. gRPC's server default is 5
#: minutes: a client pinging more often while the server sends nothing (a long task, an
#: ExecuteFlow waiting for its flow) gets a strike per ping, and the third strike closes
#: the connection with GOAWAY "too_many_pings". A client with keepalive at 10 s (the least
#: grpc-java and grpc-go allow; clients behind NATs and load balancers need keepalive) thus
#: lost its call after 30-40 s, and the flow was cancelled as if its caller had gone.
CLIENT_MIN_PING_INTERVAL_MS = 5_000
#: How often the server pings a connection, and how long it waits for the answer before
#: it takes the client for gone (its calls cancelled, and so their flows).
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000
#: Names of the threads that run sync tasks.
TASK_THREAD_PREFIX = "flowsvc-task"


def package_version() -> str:
    """The installed package's version, as its metadata (pyproject's) gives it."""
    try:
        return importlib.metadata.version("flowsvc")
    except importlib.metadata.PackageNotFoundError:  # run from a tree never installed
        return "unknown (not installed)"


#: The entry-point group through which installed packages add tasks.
ENTRY_POINT_GROUP = "flowsvc.tasks"


def load_task_modules(
    modules: tuple[str, ...], registry: TaskRegistry, *, entry_points: bool = True
) -> None:
    """Add to `registry` the tasks of installed packages (entry-point group
    `flowsvc.tasks`) and of `modules`. An entry point names a TaskRegistry object
    (`pkg.tasks:registry`) or a module, as `modules` do: a module's @register_task
    calls fill the default registry, and its own TaskRegistry objects are merged.
    Raises TaskModuleError, and TaskRegistrationError for a name registered twice
    (naming both sources)."""
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            before = len(default_registry)
            try:
                loaded = ep.load()
            except (Exception, SystemExit) as exc:  # sys.exit() at import: see below
                raise TaskModuleError(
                    f"cannot load entry point {ep.name} = {ep.value} (group "
                    f"{ENTRY_POINT_GROUP}): {type(exc).__name__}: {exc}"
                ) from exc
            if isinstance(loaded, TaskRegistry):
                registry.merge(loaded)
            elif isinstance(loaded, types.ModuleType):
                _add_module(loaded, before, registry, f"{ep.name} = {ep.value}")
            else:
                raise TaskModuleError(
                    f"entry point {ep.name} = {ep.value} is a {type(loaded).__name__}; "
                    "it must name a module or a flowsvc.TaskRegistry"
                )
    for name in modules:
        before = len(default_registry)
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit) as exc:
            # A module that checks its configuration may sys.exit() as it is imported:
            # let through, the server stopped with that code and no word of which module
            # (none at all for a number). KeyboardInterrupt is still the operator's Ctrl-C.
            raise TaskModuleError(
                f"cannot import task module {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        _add_module(module, before, registry)
    registry.merge(default_registry)


def _add_module(
    module: types.ModuleType, before: int, registry: TaskRegistry, entry_point: str = ""
) -> None:
    """Merge the TaskRegistry objects a task module builds (as a task package does for
    its entry point); warn of a module that brings no task (`before`: the default
    registry's size before it was imported)."""
    own = [
        value
        for value in vars(module).values()
        if isinstance(value, TaskRegistry) and value is not default_registry
    ]
    for found in own:
        registry.merge(found)
    name = module.__name__
    if (
        not own
        and len(default_registry) == before
        and not any(spec.fn.__module__ == name for spec in default_registry)
    ):
        fields: dict[str, Any] = {"task_module": name}
        if entry_point:  # the installed package's, which the operator did not name
            fields["entry_point"] = entry_point
        log_event(
            logger,
            logging.WARNING,
            "task module registered no tasks",
            hint="register tasks with @register_task, or define a flowsvc.TaskRegistry",
            **fields,
        )


def _bind_problem(listen: str) -> str | None:
    """Why `listen` (host:port) cannot be bound, as the system says it (gRPC's error does
    not): the same bind, tried with a plain socket. None if it can be bound after all."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return _unix_bind_problem(listen)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "::"
    try:
        addresses = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, ValueError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _unix_bind_problem(listen: str) -> str | None:
    """Why the socket of a unix: or unix-abstract: address cannot be bound, or None."""
    scheme, _, name = listen.partition(":")
    address = "\0" + name if scheme == "unix-abstract" else name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    if scheme == "unix":
        os.unlink(name)  # the probe's own socket file, made by the bind above
    return None


def _unix_socket_in_use(listen: str) -> bool:
    """Whether a server accepts connections on the socket file of a `unix:` address (one
    left by a server that crashed refuses them: gRPC takes its place)."""
    if not listen.startswith("unix:"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Never blocking: a hung server's full backlog made the start wait for ever.
        probe.settimeout(UNIX_PROBE_SECONDS)
        try:
            probe.connect(listen.removeprefix("unix:"))
        except (BlockingIOError, TimeoutError):
            return True  # a server listens there, but accepts no more (hung, overloaded)
        except OSError:
            return False
    return True


#: How long the in-use check of a unix: socket may wait for its connection.
UNIX_PROBE_SECONDS = 2.0


#: Server reflection's current name. grpcio-reflection serves only v1alpha, which older
#: tools (grpcurl 1.8) use; newer ones ask for v1 first.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
#: Every service this server serves, as reflection lists them.
SERVICES = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Reflection as both grpc.reflection.v1alpha and grpc.reflection.v1. v1 is v1alpha
    promoted: the same messages, with the same field numbers, in a new package. So one
    servicer answers both, and v1's descriptor (for clients that describe it) is made
    from v1alpha's."""
    _add_reflection_v1_descriptor()
    servicer = _DocumentedReflection(SERVICES)
    service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                reflection.SERVICE_NAME, _library_handlers(service, servicer)
            ),
            # v1's errors name v1's request type.
            grpc.method_handlers_generic_handler(
                REFLECTION_V1, _library_handlers(service, servicer, package="grpc.reflection.v1")
            ),
        )
    )


#: The FileDescriptorSet of proto/ with its comments, beside the generated code.
DESCRIPTOR_SET = "descriptor_set.binpb"


def _comments() -> dict[str, descriptor_pb2.SourceCodeInfo]:
    """The comments (SourceCodeInfo) of flowmanager's .proto files, by file name."""
    blob = importlib.resources.files(flow_service_pb2.__package__).joinpath(DESCRIPTOR_SET)
    files = descriptor_pb2.FileDescriptorSet.FromString(blob.read_bytes()).file
    return {file.name: file.source_code_info for file in files}


# reflection.aio is the library's public asyncio servicer; its type stubs omit it.
class _DocumentedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc,name-defined]
    """grpc's asyncio reflection servicer, sending flowmanager's files with their comments.

    The library serializes files from the descriptor pool, which keeps no comments
    (SourceCodeInfo), so `grpcurl describe` showed bare fields. Each flowmanager file in
    an answer gets protoc's SourceCodeInfo back (scripts/gen_protos.py), and nothing else
    changes: protoc's own file would also carry json_name, and grpcurl would then print
    flowId where it prints flow_id.
    """

    def __init__(self, service_names: tuple[str, ...]) -> None:
        super().__init__(service_names)
        self._comments = _comments()

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        """The file declaring a symbol, a method included: reflection's symbols are
        `<package>.<service>[.<method>]` or `<package>.<type>`, but the descriptor pool's
        lookup knows no methods, so `grpcurl describe pkg.Service.Method` was NOT_FOUND."""
        service, _, method = fully_qualified_name.rpartition(".")
        try:
            found = self._pool.FindServiceByName(service).methods_by_name[method]
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)
        return super()._file_containing_symbol(request, found.containing_service.full_name)

    async def ServerReflectionInfo(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for i, serialized in enumerate(files):
                    file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
                    comments = self._comments.get(file.name)
                    if comments is not None:
                        file.source_code_info.CopyFrom(comments)
                        files[i] = file.SerializeToString()
            yield response


def _add_reflection_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    try:
        pool.FindFileByName(name)
        return  # there already (another server in this process, or a newer library)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = name, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # messages and enums only
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def _method_handlers(servicer: FlowServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Handlers for every FlowService method, with a deserializer that never raises."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        request_cls = getattr(flow_service_pb2, method.input_type.name)
        response_cls = getattr(flow_service_pb2, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return handlers


def _library_handlers(
    service: descriptor.ServiceDescriptor, servicer: object, package: str | None = None
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Handlers for the methods of grpc's own servicers (health, reflection), with the
    deserializer that never raises: bytes that do not parse get INVALID_ARGUMENT, as on
    FlowService. (grpc's own handlers answer them UNKNOWN "Unexpected <class
    ...DecodeError>", and log an ERROR with a traceback for each.) `package`: the one
    the service is served under, when not its own (errors name its request type)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        request_name = (
            f"{package}.{method.input_type.name}" if package else method.input_type.full_name
        )
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = _rejecting_malformed(getattr(servicer, method.name), method.client_streaming)
        make: Callable[..., grpc.RpcMethodHandler[Any, Any]] = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            behavior,
            request_deserializer=safe_deserializer(request_cls, request_name),
            response_serializer=response_cls.SerializeToString,
        )
    return handlers


def _rejecting_malformed(behavior: Any, request_streaming: bool) -> Any:
    """`behavior`, ending the call INVALID_ARGUMENT at a request that did not parse."""

    async def checked(
        requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, MalformedRequest):
                await abort_malformed(context, request)
            yield request

    if request_streaming:
        # grpc's servicers that take a stream of requests answer with a stream.
        async def streams(
            requests: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response

        return streams

    if inspect.isasyncgenfunction(behavior):

        async def generates(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, MalformedRequest):
                await abort_malformed(context, request)
            async for response in behavior(request, context):
                yield response

        return generates

    async def answers(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, MalformedRequest):
            await abort_malformed(context, request)
        return await behavior(request, context)

    return answers


# grpc's stubs make GenericRpcHandler generic; the class itself cannot be subscripted.
class _UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The last handler: a method no service has is UNIMPLEMENTED naming it and the
    services there are (grpc's own answer, "Method not found!", names neither: a client
    built from an older or mistyped .proto could not tell what it had called)."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self._services = ", ".join(services)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        message = (
            f"unknown method {method}; "
            f"this server serves {self._services} (list them with reflection)"
        )

        async def unimplemented(
            requests: AsyncIterable[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            await abort_with(context, UnknownMethodError(message, metadata={"method": method}))

        return grpc.stream_stream_rpc_method_handler(unimplemented)


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpc's asyncio health servicer, whose Watch streams end cleanly at shutdown.

    Left alone, a Watch stream never ends, and stopping the server cancels it, which grpc
    logs as an error. Here, close() ends every Watch with UNAVAILABLE (after it has sent
    NOT_SERVING), so a watcher learns why and may reconnect elsewhere.
    """

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()
        self._watching = 0
        self._no_watchers = asyncio.Event()
        self._no_watchers.set()

    async def Check(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """The status of a service; NOT_FOUND with a reason and a message for a name that
        has none (grpc's servicer sends NOT_FOUND with neither)."""
        status = self._server_status.get(request.service)
        if status is None:
            await abort_with(
                context,
                NotFoundError(
                    f"no health status for service {request.service!r}",
                    reason="SERVICE_NOT_FOUND",
                    metadata={"service": request.service},
                ),
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        """Every service's status ("" is the server), which grpc's servicer leaves
        unimplemented (and logs the NotImplementedError it raises as an error)."""
        response = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            response.statuses[service].status = status
        return response

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._closing.is_set():
            await abort_with(context, ShuttingDownError("server is shutting down"))
        self._watching += 1
        self._no_watchers.clear()
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, closing):
                task.cancel()
            await asyncio.gather(watch, closing, return_exceptions=True)
            self._watching -= 1
            if self._watching == 0:
                self._no_watchers.set()
        await abort_with(context, ShuttingDownError("server is shutting down"))

    async def close(self, wait_seconds: float) -> None:
        """End every Watch stream; wait up to `wait_seconds` for them to go."""
        self._closing.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_watchers.wait(), wait_seconds)


class FlowServer:
    """A started server and what its shutdown needs."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        servicer: FlowServicer,
        manager: ExecutionManager,
        health_servicer: _HealthServicer,
        executor: TaskThreads,
        settings: Settings,
        metrics_endpoint: MetricsEndpoint | None = None,
    ) -> None:
        self.server = server
        #: Serves GET /metrics (with --metrics-listen), else None.
        self.metrics_endpoint = metrics_endpoint
        self.port = port
        self._servicer = servicer
        #: Reports an event loop that a task blocks (see flowsvc.stalls).
        self._stalls = StallWatch()
        self._stalls.start()
        self.manager = manager
        self.health = health_servicer
        self._executor = executor
        self._settings = settings
        self._stopped = False
        #: When (monotonic) shutdown stopped the flows still running at the grace period's
        #: end; None if every flow ended within it.
        self.flows_stopped_at: float | None = None

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, refuse new flows, let running ones finish."""
        if self._stopped:
            return
        self._stopped = True
        grace = self._settings.grace_seconds if grace is None else grace
        # A client that stopped reading its stream holds its RPC until server.stop gives
        # up on it: that wait must not push the exit past the grace period and the
        # cut-off second (the image's 8 s grace must end before docker stop's 10 s kill).
        stop_by = time.monotonic() + grace + CUT_OFF_SECONDS
        await self.health.enter_graceful_shutdown()
        self.manager.draining = True
        log_event(
            logger,
            logging.INFO,
            "shutting down",
            running_flows=self.manager.in_flight,
            grace_seconds=grace,
        )
        try:
            if self.manager.in_flight:
                await asyncio.wait_for(self.manager.wait_idle(), timeout=grace)
        except TimeoutError:
            log_event(
                logger,
                logging.WARNING,
                "grace period over; cancelling running flows",
                running_flows=self.manager.in_flight,
            )
            # They end CANCELLED (recorded), and their callers get that as data with OK.
            self.flows_stopped_at = time.monotonic()
            self.manager.stop_all("the server is shutting down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.manager.wait_idle(), timeout=CUT_OFF_SECONDS)
            # One still running has ignored its cancellation for CUT_OFF_SECONDS: it is
            # cut off now (recorded INTERRUPTED, its callers told), without a second wait,
            # so that no call waits for it below.
            await self.manager.cut_off(wait=0)
        await self.health.close(wait_seconds=1.0)
        # The flows have ended; their RPCs may still be sending the last messages: let
        # them (stop returns as soon as every RPC is done).
        if grace > 0:
            await self._settle(stop_by)
        left = stop_by - time.monotonic()
        await self.server.stop(max(FINAL_RPC_MIN_SECONDS, min(FINAL_RPC_GRACE_SECONDS, left)))
        # Whatever still runs now (a task ignoring cancellation) is cut off, recorded
        # INTERRUPTED, and the store is closed.
        await self.manager.close()
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.close()
        await http_task.aclose_clients()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stalls.stop()
        log_event(logger, logging.INFO, "stopped")

    async def _settle(self, stop_by: float) -> None:
        """Let the calls that still come (gRPC may hold some unanswered) be answered
        UNAVAILABLE, until none has come for SETTLE_QUIET_SECONDS (see there), counted
        from now at the earliest: the callers of the flows that have just ended are being
        answered, and a client sends its next call the moment it has its answer. Counted
        from the last call only, which those callers made long before, the server stopped
        at once and their next calls ended CANCELLED."""
        began = time.monotonic()
        until = min(began + SETTLE_MAX_SECONDS, stop_by - FINAL_RPC_MIN_SECONDS)
        while (now := time.monotonic()) < until:
            quiet = now - max(self._servicer.last_call, began)
            if quiet >= SETTLE_QUIET_SECONDS:
                return
            await asyncio.sleep(min(SETTLE_QUIET_SECONDS - quiet, until - now))

    async def wait(self) -> None:
        await self.server.wait_for_termination()


#: What SQLite says of a database that reached its max_page_count, or of a full disk.
_FULL = "database or disk is full"


def _full_at_start(settings: Settings, exc: StoreUnavailableError) -> StoreUnavailableError:
    """A store full at start, once crash recovery and retention have run, refuses to start:
    say which database, at which cap, and what makes room."""
    if not settings.db_max_bytes:
        # No cap: the file system is full. A larger cap would change nothing, and rows
        # deleted free no disk (SQLite keeps the pages; a full disk cannot even take the
        # delete's write-ahead log).
        return StoreUnavailableError(
            f"database {settings.db} cannot be written: the disk holding it is full ({exc}); "
            "free room on its file system (the database, its -wal and -shm files, and their "
            "directory's other files share it)"
        )
    return StoreUnavailableError(
        f"database {settings.db} is full at --db-max-bytes {settings.db_max_bytes} ({exc}), "
        "once crash recovery and retention have run: start it with a larger --db-max-bytes "
        "(or free the disk), or delete ended executions from it"
    )


async def build_server(settings: Settings, registry: TaskRegistry | None = None) -> FlowServer:
    """Build, bind and start a server. `registry` defaults to the built-ins plus the
    settings' task modules."""
    if registry is None:
        registry = TaskRegistry.with_builtins()
        load_task_modules(settings.task_modules, registry)
    # Checked before the store is opened: a bad certificate changes nothing on disk.
    tls = None
    if settings.tls_cert:
        tls = ServerTLS(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    metrics = Metrics() if settings.metrics_listen else None
    executor = TaskThreads(settings.sync_task_workers, name=TASK_THREAD_PREFIX)
    engine = FlowEngine(registry, settings.limits, executor)
    health_servicer = _HealthServicer()
    health_updates: set[asyncio.Future[None]] = set()

    def store_health(healthy: bool) -> None:
        # NOT_SERVING while the store cannot write; ignored once shutdown has begun.
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            task = asyncio.ensure_future(health_servicer.set(service, status))
            health_updates.add(task)
            task.add_done_callback(health_updates.discard)

    store: ExecutionStore = (
        MemoryStore()
        if settings.db == MEMORY
        else SQLiteStore(
            settings.db,
            synchronous=settings.db_synchronous,
            busy_timeout_ms=settings.db_busy_timeout_ms,
            max_bytes=settings.db_max_bytes,
        )
    )
    manager = ExecutionManager(
        engine,
        store,
        ManagerSettings(
            max_in_flight=settings.max_in_flight,
            retention_seconds=settings.retention_seconds,
            max_record_bytes=settings.max_response_bytes,
        ),
        on_store_health=store_health,
        flow_bytes=convert.flow_bytes,
        input_bytes=convert.input_bytes,
        metrics=metrics,
    )
    try:
        recovered = await manager.open()
    except StoreUnavailableError as exc:
        if _FULL in str(exc):
            raise _full_at_start(settings, exc) from exc
        if any(f"{word} {settings.db}" in str(exc) for word in ("database", "database file")):
            raise  # its own message, naming the file (a file named "data" is in "database")
        # Refused by the write check (a read-only file, a lock held too long ...):
        # "execution store unavailable: attempt to write a readonly database" said
        # nothing of which file.
        hint = (
            ": give the server's user write access to it, its -wal and -shm files and its directory"
            if "readonly" in str(exc)
            else ""
        )
        raise StoreUnavailableError(
            f"database {settings.db} cannot be written at start ({exc}){hint}"
        ) from exc
    endpoint = None
    try:
        if metrics is not None:
            endpoint = await _serve_metrics(settings.metrics_listen, metrics, manager)
        server, port, servicer = await _listen(settings, manager, health_servicer, tls, metrics)
    except BaseException:
        if endpoint is not None:
            await endpoint.close()
        await manager.close()  # and with it the store, and its lock on the database
        raise
    log_event(
        logger,
        logging.INFO,
        "server started",
        listen=settings.listen,
        port=port,
        metrics_port=endpoint.port if endpoint is not None else None,
        tls="off" if tls is None else "mutual" if settings.tls_client_ca else "on",
        db=settings.db,
        interrupted_by_crash=len(recovered),
        tasks=registry.names(),
        # What this server runs with, whichever of flag, variable or default gave it: the
        # settings hold addresses, paths and limits, no secrets.
        settings=dataclasses.asdict(settings),
        event_loop="uvloop"
        if "uvloop" in type(asyncio.get_running_loop()).__module__
        else "asyncio",
        version=package_version(),
    )
    return FlowServer(
        server, port, servicer, manager, health_servicer, executor, settings, endpoint
    )


async def _serve_metrics(
    listen: str, metrics: Metrics, manager: ExecutionManager
) -> MetricsEndpoint:
    """The metrics endpoint, listening, with the figures read at each scrape."""
    read = metrics.read_at_scrape
    read.append(
        (
            "flowsvc_executions_in_flight",
            "Executions running now.",
            "gauge",
            lambda: manager.in_flight,
        )
    )
    read.append(
        (
            "flowsvc_store_healthy",
            "1 while the execution store can write, else 0 (health is NOT_SERVING).",
            "gauge",
            lambda: manager.store_healthy,
        )
    )
    store = manager.store
    if isinstance(store, SQLiteStore):
        read.append(
            (
                "flowsvc_store_commits_total",
                "Transactions the SQLite store has committed (each a batch of jobs).",
                "counter",
                lambda: store.commits,
            )
        )
        read.append(
            (
                "flowsvc_store_jobs_total",
                "Jobs the SQLite store has run.",
                "counter",
                lambda: store.jobs,
            )
        )
    endpoint = MetricsEndpoint(metrics)
    try:
        await endpoint.start(listen)
    except OSError as exc:
        # asyncio's words for a failed bind repeat the address, as a Python tuple: the
        # errno's say what is wrong, as --listen's message does. A name that does not
        # resolve has a negative errno, and its own words.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise OSError(f"cannot listen on --metrics-listen {listen}: {reason}") from exc
    return endpoint


async def _listen(
    settings: Settings,
    manager: ExecutionManager,
    health_servicer: _HealthServicer,
    tls: ServerTLS | None = None,
    metrics: Metrics | None = None,
) -> tuple[grpc.aio.Server, int, FlowServicer]:
    """The gRPC server with every service, listening and SERVING; its port; its
    FlowService servicer."""
    servicer = FlowServicer(manager, settings.max_response_bytes, metrics)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # Refuse to share a port with another process (a second server would
            # silently split the traffic).
            ("grpc.so_reuseport", 0),
            # grpc cancels calls that arrive faster than the server takes them once more
            # than 1,000 (3,000 hard) are pending, with status CANCELLED, which clients
            # read as their own doing: a burst must reach --max-in-flight's check and get
            # RESOURCE_EXHAUSTED with RetryInfo.
            ("grpc.server.max_pending_requests", max(10_000, 4 * settings.max_in_flight)),
            (
                "grpc.server.max_pending_requests_hard_limit",
                max(20_000, 8 * settings.max_in_flight),
            ),
            # Client keepalive pings: welcome every CLIENT_MIN_PING_INTERVAL_MS, with or
            # without calls (gRPC's default takes any closer than 5 minutes for abuse).
            ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_MIN_PING_INTERVAL_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            # The server's own pings: a client whose network vanished without closing the
            # connection (no FIN, no RST) is found gone, and its flow cancelled, within
            # SERVER_KEEPALIVE_TIME_MS + SERVER_KEEPALIVE_TIMEOUT_MS, not 2 hours (gRPC's
            # default), nor never while its flow's task keeps the connection silent.
            ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
            # gRPC waits for a ping's answer 1 minute whatever the keepalive timeout says.
            ("grpc.http2.ping_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
            # and sends no more than 2 pings while it sends no data, unless told otherwise.
            ("grpc.http2.max_pings_without_data", 0),
        ]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, _method_handlers(servicer)),)
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                health.SERVICE_NAME,
                _library_handlers(
                    health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer
                ),
            ),
        )
    )
    _enable_reflection(server)
    # Last: grpc asks the handlers in order.
    server.add_generic_rpc_handlers((_UnknownMethods(SERVICES),))
    if _unix_socket_in_use(settings.listen):
        # gRPC removes the socket file before it binds: the running server would serve on,
        # unreachable, and remove this one's socket file when it stops.
        raise OSError(
            f"cannot listen on {settings.listen}: Address already in use (a server is "
            "listening on that socket)"
        )
    try:
        if tls is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, tls.credentials())
    except RuntimeError as exc:  # grpc: "Failed to bind to address ...", and no reason
        reason = _bind_problem(settings.listen) or str(exc)
        raise OSError(f"cannot listen on {settings.listen}: {reason}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer
