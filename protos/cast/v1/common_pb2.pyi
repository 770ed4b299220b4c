from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenTree(_message.Message):
    __slots__ = ("tokens", "parents", "depths", "values")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DEPTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    depths: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., depths: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class CostTable(_message.Message):
    __slots__ = ("device", "model_id", "dtype", "batch_sizes", "context_buckets", "token_counts", "millis")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MILLIS_FIELD_NUMBER: _ClassVar[int]
    device: str
    model_id: str
    dtype: str
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    context_buckets: _containers.RepeatedScalarFieldContainer[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    millis: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, device: _Optional[str] = ..., model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., context_buckets: _Optional[_Iterable[int]] = ..., token_counts: _Optional[_Iterable[int]] = ..., millis: _Optional[_Iterable[float]] = ...) -> None: ...

class ReplicaDescription(_message.Message):
    __slots__ = ("model_name", "vocab_hash", "vocab_size", "max_context", "device", "dtype", "cost_table", "backend", "live_sequences", "max_sequences", "draft_levels")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_HASH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COST_TABLE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LEVELS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_hash: str
    vocab_size: int
    max_context: int
    device: str
    dtype: str
    cost_table: CostTable
    backend: str
    live_sequences: int
    max_sequences: int
    draft_levels: _containers.RepeatedCompositeFieldContainer[DraftLevel]
    def __init__(self, model_name: _Optional[str] = ..., vocab_hash: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., cost_table: _Optional[_Union[CostTable, _Mapping]] = ..., backend: _Optional[str] = ..., live_sequences: _Optional[int] = ..., max_sequences: _Optional[int] = ..., draft_levels: _Optional[_Iterable[_Union[DraftLevel, _Mapping]]] = ...) -> None: ...

class DraftLevel(_message.Message):
    __slots__ = ("name", "kind", "model_name", "cost_table")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    COST_TABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    model_name: str
    cost_table: CostTable
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., model_name: _Optional[str] = ..., cost_table: _Optional[_Union[CostTable, _Mapping]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
