"""Prometheus metrics (--metrics-listen): a real server, real flows, real scrapes, read by
prometheus_client's own parser (what Prometheus reads)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from flowmanager.v1 import flow_pb2, flow_service_pb2, flow_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from flowsvc import TaskResult
from flowsvc.config import Settings
from flowsvc.server import build_server
from tests.support import chain, server_process, wait_until

pb = flow_service_pb2
SERVE = (sys.executable, "-m", "flowsvc", "serve", "--listen", "127.0.0.1:0")


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels, parsed as Prometheus parses it."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_flows_tasks_and_errors_are_counted(registry) -> None:
    def flaky_text() -> TaskResult:
        return TaskResult.failure('said "no"\nthen left')

    registry.register('odd"name\\', flaky_text)
    settings = Settings(listen="127.0.0.1:0", db=":memory:", metrics_listen="127.0.0.1:0")
    server = await build_server(settings, registry)
    try:
        port = server.metrics_endpoint.port
        before = samples(await asyncio.to_thread(scrape, port))
        assert before[("flowsvc_executions_started_total", ())] == 0
        assert before[("flowsvc_executions_in_flight", ())] == 0
        assert before[("flowsvc_store_healthy", ())] == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            for _ in range(3):
                done = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("noop", "echo")))
                assert done.status == flow_pb2.FLOW_STATUS_SUCCEEDED
            failed = await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain('odd"name\\')))
            assert failed.status == flow_pb2.FLOW_STATUS_FAILED
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetExecution(pb.GetExecutionRequest(flow_id=str(done.flow_id[:-1])))
        found = samples(await asyncio.to_thread(scrape, port))
    finally:
        await server.shutdown(grace=0)
    assert found[("flowsvc_executions_started_total", ())] == 4
    assert found[("flowsvc_executions_ended_total", (("status", "succeeded"),))] == 3
    assert found[("flowsvc_executions_ended_total", (("status", "failed"),))] == 1
    assert found[("flowsvc_execution_duration_seconds_count", ())] == 4
    assert found[("flowsvc_task_attempts_total", (("status", "success"), ("task", "noop")))] == 3
    # A label value with a quote, a backslash and (in its error, not shown) a line break.
    odd = (("status", "failure"), ("task", 'odd"name\\'))
    assert found[("flowsvc_task_attempts_total", odd)] == 1
    assert found[("flowsvc_task_duration_seconds_count", (("task", "echo"),))] == 3
    inf = (("le", "+Inf"), ("task", "echo"))
    assert found[("flowsvc_task_duration_seconds_bucket", inf)] == 3
    assert found[("flowsvc_rpcs_total", (("method", "ExecuteFlow"),))] == 4
    assert found[("flowsvc_rpcs_total", (("method", "GetExecution"),))] == 1
    error = (("method", "GetExecution"), ("reason", "ARGUMENT_INVALID"))
    assert found[("flowsvc_rpc_errors_total", error)] == 1
    assert found[("flowsvc_executions_in_flight", ())] == 0
    assert found[("process_resident_memory_bytes", ())] > 1_000_000
    assert found[("process_cpu_seconds_total", ())] > 0


async def test_a_running_execution_is_in_flight_and_a_cut_off_one_ends_interrupted(
    registry, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def held() -> TaskResult:
        await gate.wait()
        return TaskResult.success()

    registry.register("held", held)
    settings = Settings(
        listen="127.0.0.1:0", db=str(tmp_path / "m.db"), metrics_listen="127.0.0.1:0"
    )
    server = await build_server(settings, registry)
    port = server.metrics_endpoint.port
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            call = stub.StreamFlow(pb.StreamFlowRequest(flow=chain("held")))
            assert (await call.read()).WhichOneof("event") == "started"
            found = samples(await asyncio.to_thread(scrape, port))
            assert found[("flowsvc_executions_in_flight", ())] == 1
            assert found[("flowsvc_store_commits_total", ())] >= 1  # SQLite's own figures
            assert found[("flowsvc_store_jobs_total", ())] >= 2
            server.manager.stop_all("the test stops it")
            await server.manager.cut_off(wait=0)
            call.cancel()
        found = samples(await asyncio.to_thread(scrape, port))
    finally:
        gate.set()
        await server.shutdown(grace=0)
    ended = {k[1]: v for k, v in found.items() if k[0] == "flowsvc_executions_ended_total"}
    assert sum(ended.values()) == 1, ended
    assert set(ended) <= {(("status", "cancelled"),), (("status", "interrupted"),)}


async def test_an_execution_a_store_failure_cut_off_ends_interrupted_not_as_its_engine_said(
    registry, tmp_path: Path
) -> None:
    # Events were counted as they were queued for commit: a flow whose result did not fit
    # under --db-max-bytes was counted ended succeeded, while its record said INTERRUPTED
    # and its caller was told UNAVAILABLE.
    @registry.task("too_large")
    async def too_large() -> TaskResult:
        return TaskResult.success({"pad": "x" * 400_000})

    settings = Settings(
        listen="127.0.0.1:0",
        db=str(tmp_path / "full.db"),
        db_max_bytes=300_000,
        metrics_listen="127.0.0.1:0",
    )
    server = await build_server(settings, registry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = flow_service_pb2_grpc.FlowServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ExecuteFlow(pb.ExecuteFlowRequest(flow=chain("too_large")), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.to_thread(wait_until, lambda: server.manager.store_healthy)
            (record,) = (await stub.ListExecutions(pb.ListExecutionsRequest())).executions
            assert record.status == flow_pb2.FLOW_STATUS_INTERRUPTED
        found = samples(await asyncio.to_thread(scrape, server.metrics_endpoint.port))
    finally:
        await server.shutdown(grace=0)
    ended = {k[1]: v for k, v in found.items() if k[0] == "flowsvc_executions_ended_total"}
    assert ended == {(("status", "interrupted"),): 1}
    assert found[("flowsvc_executions_started_total", ())] == 1
    assert found[("flowsvc_execution_duration_seconds_count", ())] == 1
    attempts = [k for k in found if k[0] == "flowsvc_task_attempts_total"]
    assert attempts == []  # its one attempt's result was never committed


def metrics_port(srv) -> int:
    """The port of a `flowsvc serve` subprocess's metrics, from the line it prints."""
    line = wait_until(lambda: _metrics_line(srv.log_path))
    found = re.fullmatch(r"flowsvc: metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
    assert found, line
    return int(found[1])


def test_other_paths_and_methods_are_refused(tmp_path: Path) -> None:
    with server_process(tmp_path, "--db", ":memory:", "--metrics-listen", "127.0.0.1:0") as srv:
        port = metrics_port(srv)
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(port, "/")
        assert info.value.code == 404
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405 and info.value.headers["Allow"] == "GET, HEAD"
        # A request line and headers past 16 KiB get 431 and the connection closes.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        # Lines ended by a bare LF (nc, a hand-written probe) are taken too: before, no
        # answer came until the 10 s request timeout closed the connection.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /metrics HTTP/1.0\nHost: x\n\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 200 ")
        # A silent or half-sent request does not hold the server: others still scrape.
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            assert "flowsvc_rpcs_total" in scrape(port)


def test_the_address_is_printed_and_a_busy_port_refuses_to_start(tmp_path: Path) -> None:
    with server_process(tmp_path, "--db", ":memory:", "--metrics-listen", "127.0.0.1:0") as srv:
        port = metrics_port(srv)
        assert "flowsvc_executions_started_total 0" in scrape(port)
        busy = subprocess.run(
            [*SERVE, "--db", ":memory:", "--metrics-listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
    assert busy.returncode == 2, busy.stderr
    # In the words --listen's busy port gets, not asyncio's (which repeat the address).
    assert busy.stderr.endswith(
        f"cannot listen on --metrics-listen 127.0.0.1:{port}: Address already in use\n"
    ), busy.stderr
    assert "Traceback" not in busy.stderr


def test_a_scrape_connection_open_at_shutdown_neither_logs_a_traceback_nor_holds_the_exit(
    tmp_path: Path,
) -> None:
    # Its task was cancelled as the event loop closed, and asyncio logged an ERROR with a
    # CancelledError traceback for it (on Python 3.12 and later, the exit also waited for
    # it: up to 10 s for one that sends nothing).
    with server_process(tmp_path, "--db", ":memory:", "--metrics-listen", "127.0.0.1:0") as srv:
        port = metrics_port(srv)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10),
            socket.create_connection(("127.0.0.1", port), timeout=10) as half,
        ):
            half.sendall(b"GET /metrics HTTP/1.1\r\n")
            assert "flowsvc_rpcs_total" in scrape(port)  # both have been taken
            srv.proc.send_signal(signal.SIGTERM)
            assert srv.proc.wait(timeout=30) == 0
    log = srv.log_path.read_text()
    assert '"msg": "stopped"' in log
    assert "Traceback" not in log and "Exception in callback" not in log, log


def _started_by_proc() -> float:
    """This process's start (Unix time), as the kernel tells it."""
    stat = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
    boot = next(
        int(line.split()[1])
        for line in Path("/proc/stat").read_bytes().splitlines()
        if line.startswith(b"btime ")
    )
    return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc")
async def test_process_start_time_is_when_the_process_started(registry) -> None:
    # It was when the metrics were set up: a second or more after the process started
    # (the imports), and in a test process later still.
    started = _started_by_proc()
    settings = Settings(listen="127.0.0.1:0", db=":memory:", metrics_listen="127.0.0.1:0")
    server = await build_server(settings, registry)
    try:
        found = samples(await asyncio.to_thread(scrape, server.metrics_endpoint.port))
    finally:
        await server.shutdown(grace=0)
    assert found[("process_start_time_seconds", ())] == pytest.approx(started, abs=0.05)


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 on this machine")
async def test_all_addresses_in_ipv6_form_take_ipv4_scrapers_too(registry) -> None:
    # `--listen [::]:50051` takes IPv4 clients; `--metrics-listen [::]:9464` listened on
    # IPv6 only (asyncio makes its IPv6 sockets IPv6-only): a scrape of 127.0.0.1, or of
    # a pod's IPv4 address, was refused.
    settings = Settings(listen="127.0.0.1:0", db=":memory:", metrics_listen="[::]:0")
    server = await build_server(settings, registry)
    try:
        port = server.metrics_endpoint.port
        assert "flowsvc_rpcs_total" in await asyncio.to_thread(scrape, port)
        url = f"http://[::1]:{port}/metrics"
        answer = await asyncio.to_thread(urllib.request.urlopen, url, timeout=10)
        with answer:
            assert answer.status == 200
    finally:
        await server.shutdown(grace=0)


@pytest.mark.parametrize("value", ["unix:/tmp/m.sock", "9464", "::1:9464", "h:70000"])
def test_a_metrics_address_that_is_not_host_port_is_a_bad_configuration(value) -> None:
    from flowsvc import config

    with pytest.raises(ValueError, match="FLOWSVC_METRICS_LISTEN"):
        config.from_sources({}, {"FLOWSVC_METRICS_LISTEN": value})
    assert config.from_sources({}, {"FLOWSVC_METRICS_LISTEN": " "}).metrics_listen == ""


def _metrics_line(log_path: Path) -> str | None:
    for line in log_path.read_text().splitlines():
        if line.startswith("flowsvc: metrics on "):
            return line
    return None
