from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FadeStep(_message.Message):
    __slots__ = ("coverage", "soak_seconds")
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    SOAK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    coverage: float
    soak_seconds: float
    def __init__(self, coverage: _Optional[float] = ..., soak_seconds: _Optional[float] = ...) -> None: ...

class GuardrailThresholds(_message.Message):
    __slots__ = ("max_mean_shift", "max_psi", "max_latency_ratio", "min_examples", "min_requests")
    MAX_MEAN_SHIFT_FIELD_NUMBER: _ClassVar[int]
    MAX_PSI_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_mean_shift: float
    max_psi: float
    max_latency_ratio: float
    min_examples: int
    min_requests: int
    def __init__(self, max_mean_shift: _Optional[float] = ..., max_psi: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_examples: _Optional[int] = ..., min_requests: _Optional[int] = ...) -> None: ...

class StartScheduleRequest(_message.Message):
    __slots__ = ("model", "feature", "steps", "thresholds", "control_fraction", "salt", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    feature: str
    steps: _containers.RepeatedCompositeFieldContainer[FadeStep]
    thresholds: GuardrailThresholds
    control_fraction: float
    salt: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., feature: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[FadeStep, _Mapping]]] = ..., thresholds: _Optional[_Union[GuardrailThresholds, _Mapping]] = ..., control_fraction: _Optional[float] = ..., salt: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FeatureRequest(_message.Message):
    __slots__ = ("model", "feature", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    feature: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., feature: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetCoverageRequest(_message.Message):
    __slots__ = ("model", "feature", "coverage", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    feature: str
    coverage: float
    reason: str
    def __init__(self, model: _Optional[str] = ..., feature: _Optional[str] = ..., coverage: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class GuardrailFigures(_message.Message):
    __slots__ = ("replica", "at", "coverage", "control_examples", "kept_examples", "faded_examples", "mean_control", "mean_kept", "mean_faded", "ratio", "ratio_kept", "psi", "latency_ratio", "lookups_skipped", "seconds")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    KEPT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FADED_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONTROL_FIELD_NUMBER: _ClassVar[int]
    MEAN_KEPT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FADED_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    RATIO_KEPT_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    replica: str
    at: float
    coverage: float
    control_examples: int
    kept_examples: int
    faded_examples: int
    mean_control: float
    mean_kept: float
    mean_faded: float
    ratio: float
    ratio_kept: float
    psi: float
    latency_ratio: float
    lookups_skipped: int
    seconds: float
    def __init__(self, replica: _Optional[str] = ..., at: _Optional[float] = ..., coverage: _Optional[float] = ..., control_examples: _Optional[int] = ..., kept_examples: _Optional[int] = ..., faded_examples: _Optional[int] = ..., mean_control: _Optional[float] = ..., mean_kept: _Optional[float] = ..., mean_faded: _Optional[float] = ..., ratio: _Optional[float] = ..., ratio_kept: _Optional[float] = ..., psi: _Optional[float] = ..., latency_ratio: _Optional[float] = ..., lookups_skipped: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class FeatureFadeStatus(_message.Message):
    __slots__ = ("model", "feature", "coverage", "status", "step", "steps", "soak_left_seconds", "safe_coverage", "control_fraction", "salt", "thresholds", "updated_at", "reason", "reclaimable", "guardrails")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SOAK_LEFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAFE_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECLAIMABLE_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    model: str
    feature: str
    coverage: float
    status: str
    step: int
    steps: _containers.RepeatedCompositeFieldContainer[FadeStep]
    soak_left_seconds: float
    safe_coverage: float
    control_fraction: float
    salt: str
    thresholds: GuardrailThresholds
    updated_at: float
    reason: str
    reclaimable: bool
    guardrails: _containers.RepeatedCompositeFieldContainer[GuardrailFigures]
    def __init__(self, model: _Optional[str] = ..., feature: _Optional[str] = ..., coverage: _Optional[float] = ..., status: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[FadeStep, _Mapping]]] = ..., soak_left_seconds: _Optional[float] = ..., safe_coverage: _Optional[float] = ..., control_fraction: _Optional[float] = ..., salt: _Optional[str] = ..., thresholds: _Optional[_Union[GuardrailThresholds, _Mapping]] = ..., updated_at: _Optional[float] = ..., reason: _Optional[str] = ..., reclaimable: _Optional[bool] = ..., guardrails: _Optional[_Iterable[_Union[GuardrailFigures, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("model", "feature")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    feature: str
    def __init__(self, model: _Optional[str] = ..., feature: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureFadeStatus]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureFadeStatus, _Mapping]]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "at", "actor", "peer", "model", "feature", "action", "from_coverage", "from_status", "to_coverage", "to_status", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    FROM_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    FROM_STATUS_FIELD_NUMBER: _ClassVar[int]
    TO_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    TO_STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: int
    at: float
    actor: str
    peer: str
    model: str
    feature: str
    action: str
    from_coverage: float
    from_status: str
    to_coverage: float
    to_status: str
    reason: str
    def __init__(self, id: _Optional[int] = ..., at: _Optional[float] = ..., actor: _Optional[str] = ..., peer: _Optional[str] = ..., model: _Optional[str] = ..., feature: _Optional[str] = ..., action: _Optional[str] = ..., from_coverage: _Optional[float] = ..., from_status: _Optional[str] = ..., to_coverage: _Optional[float] = ..., to_status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...
