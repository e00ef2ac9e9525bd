import datetime

from flowmanager.v1 import flow_pb2 as _flow_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecutionView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_VIEW_UNSPECIFIED: _ClassVar[ExecutionView]
    EXECUTION_VIEW_BASIC: _ClassVar[ExecutionView]
    EXECUTION_VIEW_FULL: _ClassVar[ExecutionView]
EXECUTION_VIEW_UNSPECIFIED: ExecutionView
EXECUTION_VIEW_BASIC: ExecutionView
EXECUTION_VIEW_FULL: ExecutionView

class ExecuteFlowRequest(_message.Message):
    __slots__ = ("flow", "input", "request_id", "continue_on_disconnect")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    flow: _flow_pb2.Flow
    input: _struct_pb2.Struct
    request_id: str
    continue_on_disconnect: bool
    def __init__(self, flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., continue_on_disconnect: _Optional[bool] = ...) -> None: ...

class ExecuteFlowResponse(_message.Message):
    __slots__ = ("flow_id", "status", "message", "execution_history")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    status: _flow_pb2.FlowStatus
    message: str
    execution_history: _containers.RepeatedCompositeFieldContainer[_flow_pb2.TaskResult]
    def __init__(self, flow_id: _Optional[str] = ..., status: _Optional[_Union[_flow_pb2.FlowStatus, str]] = ..., message: _Optional[str] = ..., execution_history: _Optional[_Iterable[_Union[_flow_pb2.TaskResult, _Mapping]]] = ...) -> None: ...

class StreamFlowRequest(_message.Message):
    __slots__ = ("flow", "input", "request_id", "continue_on_disconnect")
    FLOW_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    flow: _flow_pb2.Flow
    input: _struct_pb2.Struct
    request_id: str
    continue_on_disconnect: bool
    def __init__(self, flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ..., continue_on_disconnect: _Optional[bool] = ...) -> None: ...

class FlowStarted(_message.Message):
    __slots__ = ("flow_id", "flow_name", "started_at")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_NAME_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    flow_name: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, flow_id: _Optional[str] = ..., flow_name: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FlowFinished(_message.Message):
    __slots__ = ("status", "message", "finished_at", "steps")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    status: _flow_pb2.FlowStatus
    message: str
    finished_at: _timestamp_pb2.Timestamp
    steps: int
    def __init__(self, status: _Optional[_Union[_flow_pb2.FlowStatus, str]] = ..., message: _Optional[str] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., steps: _Optional[int] = ...) -> None: ...

class StreamFlowResponse(_message.Message):
    __slots__ = ("sequence", "started", "task_result", "finished")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TASK_RESULT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    started: FlowStarted
    task_result: _flow_pb2.TaskResult
    finished: FlowFinished
    def __init__(self, sequence: _Optional[int] = ..., started: _Optional[_Union[FlowStarted, _Mapping]] = ..., task_result: _Optional[_Union[_flow_pb2.TaskResult, _Mapping]] = ..., finished: _Optional[_Union[FlowFinished, _Mapping]] = ...) -> None: ...

class ValidateFlowRequest(_message.Message):
    __slots__ = ("flow",)
    FLOW_FIELD_NUMBER: _ClassVar[int]
    flow: _flow_pb2.Flow
    def __init__(self, flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ...) -> None: ...

class ValidateFlowResponse(_message.Message):
    __slots__ = ("valid", "violations")
    VALID_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    violations: _containers.RepeatedCompositeFieldContainer[_flow_pb2.FlowViolation]
    def __init__(self, valid: _Optional[bool] = ..., violations: _Optional[_Iterable[_Union[_flow_pb2.FlowViolation, _Mapping]]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_flow_pb2.TaskInfo]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_flow_pb2.TaskInfo, _Mapping]]] = ...) -> None: ...

class Execution(_message.Message):
    __slots__ = ("flow_id", "flow", "input", "status", "message", "request_id", "create_time", "end_time", "execution_history", "last_sequence")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_HISTORY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    flow: _flow_pb2.Flow
    input: _struct_pb2.Struct
    status: _flow_pb2.FlowStatus
    message: str
    request_id: str
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    execution_history: _containers.RepeatedCompositeFieldContainer[_flow_pb2.TaskResult]
    last_sequence: int
    def __init__(self, flow_id: _Optional[str] = ..., flow: _Optional[_Union[_flow_pb2.Flow, _Mapping]] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., status: _Optional[_Union[_flow_pb2.FlowStatus, str]] = ..., message: _Optional[str] = ..., request_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., execution_history: _Optional[_Iterable[_Union[_flow_pb2.TaskResult, _Mapping]]] = ..., last_sequence: _Optional[int] = ...) -> None: ...

class ExecutionSummary(_message.Message):
    __slots__ = ("flow_id", "flow_name", "status", "create_time", "end_time", "request_id")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    flow_name: str
    status: _flow_pb2.FlowStatus
    create_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    request_id: str
    def __init__(self, flow_id: _Optional[str] = ..., flow_name: _Optional[str] = ..., status: _Optional[_Union[_flow_pb2.FlowStatus, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetExecutionRequest(_message.Message):
    __slots__ = ("flow_id", "view")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    view: ExecutionView
    def __init__(self, flow_id: _Optional[str] = ..., view: _Optional[_Union[ExecutionView, str]] = ...) -> None: ...

class GetExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class ListExecutionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status", "flow_name")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FLOW_NAME_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: _flow_pb2.FlowStatus
    flow_name: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Union[_flow_pb2.FlowStatus, str]] = ..., flow_name: _Optional[str] = ...) -> None: ...

class ListExecutionsResponse(_message.Message):
    __slots__ = ("executions", "next_page_token")
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    executions: _containers.RepeatedCompositeFieldContainer[ExecutionSummary]
    next_page_token: str
    def __init__(self, executions: _Optional[_Iterable[_Union[ExecutionSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelExecutionRequest(_message.Message):
    __slots__ = ("flow_id",)
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    def __init__(self, flow_id: _Optional[str] = ...) -> None: ...

class CancelExecutionResponse(_message.Message):
    __slots__ = ("execution",)
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    execution: Execution
    def __init__(self, execution: _Optional[_Union[Execution, _Mapping]] = ...) -> None: ...

class WatchExecutionRequest(_message.Message):
    __slots__ = ("flow_id", "after_sequence")
    FLOW_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    flow_id: str
    after_sequence: int
    def __init__(self, flow_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchExecutionResponse(_message.Message):
    __slots__ = ("sequence", "started", "task_result", "finished")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TASK_RESULT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    started: FlowStarted
    task_result: _flow_pb2.TaskResult
    finished: FlowFinished
    def __init__(self, sequence: _Optional[int] = ..., started: _Optional[_Union[FlowStarted, _Mapping]] = ..., task_result: _Optional[_Union[_flow_pb2.TaskResult, _Mapping]] = ..., finished: _Optional[_Union[FlowFinished, _Mapping]] = ...) -> None: ...
