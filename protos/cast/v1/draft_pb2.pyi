from cast.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CastBudget(_message.Message):
    __slots__ = ("node_buckets", "token_counts", "normalized_cost", "breadth_threshold", "depth_threshold", "gain_mean", "value_scale", "step_base_cost", "depth_scales", "sibling_scales")
    NODE_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_COST_FIELD_NUMBER: _ClassVar[int]
    BREADTH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEPTH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    GAIN_MEAN_FIELD_NUMBER: _ClassVar[int]
    VALUE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STEP_BASE_COST_FIELD_NUMBER: _ClassVar[int]
    DEPTH_SCALES_FIELD_NUMBER: _ClassVar[int]
    SIBLING_SCALES_FIELD_NUMBER: _ClassVar[int]
    node_buckets: _containers.RepeatedScalarFieldContainer[int]
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    normalized_cost: _containers.RepeatedScalarFieldContainer[float]
    breadth_threshold: float
    depth_threshold: float
    gain_mean: float
    value_scale: float
    step_base_cost: float
    depth_scales: _containers.RepeatedScalarFieldContainer[float]
    sibling_scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, node_buckets: _Optional[_Iterable[int]] = ..., token_counts: _Optional[_Iterable[int]] = ..., normalized_cost: _Optional[_Iterable[float]] = ..., breadth_threshold: _Optional[float] = ..., depth_threshold: _Optional[float] = ..., gain_mean: _Optional[float] = ..., value_scale: _Optional[float] = ..., step_base_cost: _Optional[float] = ..., depth_scales: _Optional[_Iterable[float]] = ..., sibling_scales: _Optional[_Iterable[float]] = ...) -> None: ...

class ExpandBudget(_message.Message):
    __slots__ = ("top_k", "max_depth", "max_breadth", "cast", "max_returned_nodes")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BREADTH_FIELD_NUMBER: _ClassVar[int]
    CAST_FIELD_NUMBER: _ClassVar[int]
    MAX_RETURNED_NODES_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    max_depth: int
    max_breadth: int
    cast: CastBudget
    max_returned_nodes: int
    def __init__(self, top_k: _Optional[int] = ..., max_depth: _Optional[int] = ..., max_breadth: _Optional[int] = ..., cast: _Optional[_Union[CastBudget, _Mapping]] = ..., max_returned_nodes: _Optional[int] = ...) -> None: ...

class DraftSequence(_message.Message):
    __slots__ = ("sequence_id", "new_tokens", "start_position", "predict_root")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    PREDICT_ROOT_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    start_position: int
    predict_root: bool
    def __init__(self, sequence_id: _Optional[str] = ..., new_tokens: _Optional[_Iterable[int]] = ..., start_position: _Optional[int] = ..., predict_root: _Optional[bool] = ...) -> None: ...

class LevelBudget(_message.Message):
    __slots__ = ("level", "budget", "acceptance")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    level: str
    budget: ExpandBudget
    acceptance: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, level: _Optional[str] = ..., budget: _Optional[_Union[ExpandBudget, _Mapping]] = ..., acceptance: _Optional[_Iterable[float]] = ...) -> None: ...

class CascadeBudget(_message.Message):
    __slots__ = ("levels", "max_returned_nodes")
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETURNED_NODES_FIELD_NUMBER: _ClassVar[int]
    levels: _containers.RepeatedCompositeFieldContainer[LevelBudget]
    max_returned_nodes: int
    def __init__(self, levels: _Optional[_Iterable[_Union[LevelBudget, _Mapping]]] = ..., max_returned_nodes: _Optional[int] = ...) -> None: ...

class ExpandRequest(_message.Message):
    __slots__ = ("sequences", "budget", "trace_context", "cascade")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[DraftSequence]
    budget: ExpandBudget
    trace_context: _containers.ScalarMap[str, str]
    cascade: CascadeBudget
    def __init__(self, sequences: _Optional[_Iterable[_Union[DraftSequence, _Mapping]]] = ..., budget: _Optional[_Union[ExpandBudget, _Mapping]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., cascade: _Optional[_Union[CascadeBudget, _Mapping]] = ...) -> None: ...

class DraftLayerStats(_message.Message):
    __slots__ = ("candidates", "kept", "kept_utility")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    KEPT_UTILITY_FIELD_NUMBER: _ClassVar[int]
    candidates: int
    kept: int
    kept_utility: float
    def __init__(self, candidates: _Optional[int] = ..., kept: _Optional[int] = ..., kept_utility: _Optional[float] = ...) -> None: ...

class ExpandedTree(_message.Message):
    __slots__ = ("sequence_id", "tree", "layers", "expanded_nodes", "node_levels")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_NODES_FIELD_NUMBER: _ClassVar[int]
    NODE_LEVELS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: str
    tree: _common_pb2.TokenTree
    layers: _containers.RepeatedCompositeFieldContainer[DraftLayerStats]
    expanded_nodes: int
    node_levels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence_id: _Optional[str] = ..., tree: _Optional[_Union[_common_pb2.TokenTree, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[DraftLayerStats, _Mapping]]] = ..., expanded_nodes: _Optional[int] = ..., node_levels: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpandResponse(_message.Message):
    __slots__ = ("trees", "draft_seconds", "cold")
    TREES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COLD_FIELD_NUMBER: _ClassVar[int]
    trees: _containers.RepeatedCompositeFieldContainer[ExpandedTree]
    draft_seconds: float
    cold: bool
    def __init__(self, trees: _Optional[_Iterable[_Union[ExpandedTree, _Mapping]]] = ..., draft_seconds: _Optional[float] = ..., cold: _Optional[bool] = ...) -> None: ...

class ExpandStreamResponse(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ExpandResponse
    error: _common_pb2.StepError
    def __init__(self, response: _Optional[_Union[ExpandResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StepError, _Mapping]] = ...) -> None: ...

class DraftReleaseRequest(_message.Message):
    __slots__ = ("sequence_ids",)
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DraftReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class DraftDescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftDescribeResponse(_message.Message):
    __slots__ = ("replica",)
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    replica: _common_pb2.ReplicaDescription
    def __init__(self, replica: _Optional[_Union[_common_pb2.ReplicaDescription, _Mapping]] = ...) -> None: ...
