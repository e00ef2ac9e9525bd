"""The hand-rolled shortcuts of the hot path give exactly what the slow, general ways give."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from flowmanager.v1 import flow_service_pb2 as pb
from google.protobuf import timestamp_pb2

from flowsvc import convert
from flowsvc.models import FlowFinished, FlowStarted, FlowStatus, new_flow_id


def test_new_flow_ids_are_canonical_version_7_uuids_in_time_order() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_flow_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for flow_id in ids:
        parsed = uuid.UUID(flow_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == flow_id  # canonical: lower case, dashes in place
        assert before <= parsed.int >> 80 <= after  # its first 48 bits: the time, in ms
    # Every variant digit (8, 9, a, b) turns up: the random bits are not biased away.
    assert {flow_id[19] for flow_id in ids} == set("89ab")
    # One made in a later millisecond sorts after, as text too (the store's key).
    while time.time_ns() // 1_000_000 <= after:
        pass  # less than a millisecond
    assert new_flow_id() > max(ids)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 25, 20, 18, 26, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch
        datetime(2026, 3, 29, 3, 30, 0, 1, tzinfo=UTC) + timedelta(days=36500),  # far ahead
    ],
)
def test_timestamps_match_from_datetime(moment: datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment)
    started = convert.event_to_pb(FlowStarted("f", "n", moment), 1, pb.StreamFlowResponse)
    finished = convert.event_to_pb(
        FlowFinished("f", FlowStatus.SUCCEEDED, "ok", moment, 3), 5, pb.StreamFlowResponse
    )
    assert started.started.started_at == expected
    assert finished.finished.finished_at == expected
    assert started.started.started_at.ToDatetime(tzinfo=UTC) == moment
