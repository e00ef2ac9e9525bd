"""The sample flow over a real server: the first thing a user tries."""

from __future__ import annotations

from flowmanager.v1 import flow_pb2, flow_service_pb2
from google.protobuf import json_format

from tests.support import sample_request_json


async def test_sample_flow_runs_task1_task2_task3(stub) -> None:
    request = json_format.ParseDict(sample_request_json(), flow_service_pb2.ExecuteFlowRequest())
    for task in request.flow.tasks:
        task.params.update({"delay_seconds": 0.01})
    response = await stub.ExecuteFlow(request, timeout=10)
    assert response.status == flow_pb2.FLOW_STATUS_SUCCEEDED
    assert [r.task for r in response.execution_history] == ["task1", "task2", "task3"]
    assert [json_format.MessageToDict(r.data) for r in response.execution_history] == [
        {"raw_data": "data"},
        {"processed_data": "data"},
        {"storage_id": "12345"},
    ]
