import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_SUCCESS: _ClassVar[TaskStatus]
    TASK_STATUS_FAILURE: _ClassVar[TaskStatus]

class FlowStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_STATUS_UNSPECIFIED: _ClassVar[FlowStatus]
    FLOW_STATUS_RUNNING: _ClassVar[FlowStatus]
    FLOW_STATUS_SUCCEEDED: _ClassVar[FlowStatus]
    FLOW_STATUS_FAILED: _ClassVar[FlowStatus]
    FLOW_STATUS_CANCELLED: _ClassVar[FlowStatus]
    FLOW_STATUS_INTERRUPTED: _ClassVar[FlowStatus]
    FLOW_STATUS_TIMED_OUT: _ClassVar[FlowStatus]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_SUCCESS: TaskStatus
TASK_STATUS_FAILURE: TaskStatus
FLOW_STATUS_UNSPECIFIED: FlowStatus
FLOW_STATUS_RUNNING: FlowStatus
FLOW_STATUS_SUCCEEDED: FlowStatus
FLOW_STATUS_FAILED: FlowStatus
FLOW_STATUS_CANCELLED: FlowStatus
FLOW_STATUS_INTERRUPTED: FlowStatus
FLOW_STATUS_TIMED_OUT: FlowStatus

class Flow(_message.Message):
    __slots__ = ("name", "start_task", "tasks", "conditions", "max_steps", "timeout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_TASK_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_task: str
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    max_steps: int
    timeout: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., start_task: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., max_steps: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "description", "params", "timeout", "retry")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _struct_pb2.Struct
    timeout: _duration_pb2.Duration
    retry: RetryPolicy
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff", "backoff_multiplier", "max_backoff", "non_retryable_errors")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    NON_RETRYABLE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff: _duration_pb2.Duration
    backoff_multiplier: float
    max_backoff: _duration_pb2.Duration
    non_retryable_errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., backoff_multiplier: _Optional[float] = ..., max_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., non_retryable_errors: _Optional[_Iterable[str]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("name", "description", "source_task", "outcome", "target_task_success", "target_task_failure")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TASK_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TARGET_TASK_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TASK_FAILURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    source_task: str
    outcome: str
    target_task_success: str
    target_task_failure: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., source_task: _Optional[str] = ..., outcome: _Optional[str] = ..., target_task_success: _Optional[str] = ..., target_task_failure: _Optional[str] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task", "status", "data", "error", "started_at", "duration", "step", "attempt")
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task: str
    status: TaskStatus
    data: _struct_pb2.Struct
    error: str
    started_at: _timestamp_pb2.Timestamp
    duration: _duration_pb2.Duration
    step: int
    attempt: int
    def __init__(self, task: _Optional[str] = ..., status: _Optional[_Union[TaskStatus, str]] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class FlowViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "description", "source", "is_async", "takes_context", "params_schema")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    IS_ASYNC_FIELD_NUMBER: _ClassVar[int]
    TAKES_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    source: str
    is_async: bool
    takes_context: bool
    params_schema: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., source: _Optional[str] = ..., is_async: _Optional[bool] = ..., takes_context: _Optional[bool] = ..., params_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
