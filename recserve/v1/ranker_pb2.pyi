from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SparseFeature(_message.Message):
    __slots__ = ("values", "lengths", "weights")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "request_id", "batch_size", "dense", "sparse", "unit_ids")
    class SparseEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SparseFeature
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SparseFeature, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    UNIT_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    request_id: str
    batch_size: int
    dense: _containers.RepeatedScalarFieldContainer[float]
    sparse: _containers.MessageMap[str, SparseFeature]
    unit_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., dense: _Optional[_Iterable[float]] = ..., sparse: _Optional[_Mapping[str, SparseFeature]] = ..., unit_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("scores", "model", "version", "request_id")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    model: str
    version: str
    request_id: str
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "features", "rows", "dim", "dtype", "shards")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    features: _containers.RepeatedScalarFieldContainer[str]
    rows: int
    dim: int
    dtype: str
    shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[str] = ..., shards: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model", "version", "dense_features", "features", "tables", "interaction", "num_shards", "strategy", "max_batch_size", "dropped_features", "max_abs_dense")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DENSE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DENSE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    dense_features: int
    features: _containers.RepeatedScalarFieldContainer[str]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    interaction: str
    num_shards: int
    strategy: str
    max_batch_size: int
    dropped_features: _containers.RepeatedScalarFieldContainer[str]
    max_abs_dense: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., dense_features: _Optional[int] = ..., features: _Optional[_Iterable[str]] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., interaction: _Optional[str] = ..., num_shards: _Optional[int] = ..., strategy: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., dropped_features: _Optional[_Iterable[str]] = ..., max_abs_dense: _Optional[float] = ...) -> None: ...
