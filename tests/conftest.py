"""Fixtures: a real server on a free loopback port, a real grpc.aio client."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest
from flowmanager.v1 import flow_service_pb2_grpc
from grpc_health.v1 import health_pb2_grpc

from flowsvc.config import Settings
from flowsvc.registry import TaskRegistry
from flowsvc.server import FlowServer, build_server

# The tests give each server the settings they need: a FLOWSVC_* variable of the shell
# that runs them (a developer's FLOWSVC_LOG_LEVEL=WARNING, FLOWSVC_DB) must not reach the
# servers they start in subprocesses, which inherit the environment.
for _name in [name for name in os.environ if name.startswith("FLOWSVC_")]:
    del os.environ[_name]


@pytest.fixture
def registry() -> TaskRegistry:
    """A fresh registry with the built-in tasks; tests may register more."""
    return TaskRegistry.with_builtins()


@pytest.fixture
def settings() -> Settings:
    return Settings(listen="127.0.0.1:0", grace_seconds=5.0, log_level="DEBUG", db=":memory:")


@pytest.fixture
async def server(registry: TaskRegistry, settings: Settings) -> AsyncIterator[FlowServer]:
    srv = await build_server(settings, registry)
    try:
        yield srv
    finally:
        await srv.shutdown(grace=0)


@pytest.fixture
async def channel(server: FlowServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> flow_service_pb2_grpc.FlowServiceStub:
    return flow_service_pb2_grpc.FlowServiceStub(channel)


@pytest.fixture
def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)
