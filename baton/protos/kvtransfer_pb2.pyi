from baton.protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("model", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "layout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    layout: str
    def __init__(self, model: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ...) -> None: ...

class KVTicket(_message.Message):
    __slots__ = ("ticket_id", "request_id", "control_address", "transport", "ucx_address", "block_ids", "layout", "layout_fingerprint", "num_tokens", "expires_at", "tcp_address", "ipc_domain", "lora_name")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    UCX_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TCP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IPC_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    ticket_id: str
    request_id: str
    control_address: str
    transport: str
    ucx_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    layout: KVLayout
    layout_fingerprint: str
    num_tokens: int
    expires_at: float
    tcp_address: str
    ipc_domain: str
    lora_name: str
    def __init__(self, ticket_id: _Optional[str] = ..., request_id: _Optional[str] = ..., control_address: _Optional[str] = ..., transport: _Optional[str] = ..., ucx_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., layout_fingerprint: _Optional[str] = ..., num_tokens: _Optional[int] = ..., expires_at: _Optional[float] = ..., tcp_address: _Optional[str] = ..., ipc_domain: _Optional[str] = ..., lora_name: _Optional[str] = ...) -> None: ...

class KVFirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_logprobs: _common_pb2.TokenLogprobs
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...

class KVHandoffHeader(_message.Message):
    __slots__ = ("ticket_id", "layout", "src_block_ids", "num_bytes", "first_token", "staged", "max_message_bytes")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ticket_id: str
    layout: KVLayout
    src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_bytes: int
    first_token: KVFirstToken
    staged: bool
    max_message_bytes: int
    def __init__(self, ticket_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., src_block_ids: _Optional[_Iterable[int]] = ..., num_bytes: _Optional[int] = ..., first_token: _Optional[_Union[KVFirstToken, _Mapping]] = ..., staged: _Optional[bool] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class KVHandoffEnd(_message.Message):
    __slots__ = ("num_chunks",)
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    def __init__(self, num_chunks: _Optional[int] = ...) -> None: ...

class KVPushMessage(_message.Message):
    __slots__ = ("header", "chunk", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: KVHandoffHeader
    chunk: KVChunk
    end: KVHandoffEnd
    def __init__(self, header: _Optional[_Union[KVHandoffHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., end: _Optional[_Union[KVHandoffEnd, _Mapping]] = ...) -> None: ...

class KVPushReply(_message.Message):
    __slots__ = ("acked_bytes", "done", "error")
    ACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    acked_bytes: int
    done: bool
    error: _common_pb2.Error
    def __init__(self, acked_bytes: _Optional[int] = ..., done: _Optional[bool] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class KVAbortRequest(_message.Message):
    __slots__ = ("ticket_id", "error")
    TICKET_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ticket_id: str
    error: _common_pb2.Error
    def __init__(self, ticket_id: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class KVAbortReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
