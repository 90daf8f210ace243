from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORMAT_UNSPECIFIED: _ClassVar[Format]
    FORMAT_SPARSE: _ClassVar[Format]
    FORMAT_DENSE: _ClassVar[Format]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_INT8: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
FORMAT_UNSPECIFIED: Format
FORMAT_SPARSE: Format
FORMAT_DENSE: Format

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ConfigRef(_message.Message):
    __slots__ = ("preset", "config_json", "overrides")
    class OverridesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    preset: str
    config_json: str
    overrides: _containers.ScalarMap[str, str]
    def __init__(self, preset: _Optional[str] = ..., config_json: _Optional[str] = ..., overrides: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("request_id", "config", "canvas_height", "canvas_width", "gt_boxes", "gt_counts", "gt_classes", "ignore_boxes", "ignore_counts", "image_sizes", "drop_invalid", "format", "delta_dtype", "return_classes", "return_max_iou", "seed", "pad_sizes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CANVAS_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CANVAS_WIDTH_FIELD_NUMBER: _ClassVar[int]
    GT_BOXES_FIELD_NUMBER: _ClassVar[int]
    GT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    GT_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IGNORE_BOXES_FIELD_NUMBER: _ClassVar[int]
    IGNORE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZES_FIELD_NUMBER: _ClassVar[int]
    DROP_INVALID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DELTA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_CLASSES_FIELD_NUMBER: _ClassVar[int]
    RETURN_MAX_IOU_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PAD_SIZES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: ConfigRef
    canvas_height: int
    canvas_width: int
    gt_boxes: Tensor
    gt_counts: _containers.RepeatedScalarFieldContainer[int]
    gt_classes: Tensor
    ignore_boxes: Tensor
    ignore_counts: _containers.RepeatedScalarFieldContainer[int]
    image_sizes: Tensor
    drop_invalid: bool
    format: Format
    delta_dtype: DType
    return_classes: bool
    return_max_iou: bool
    seed: int
    pad_sizes: Tensor
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[ConfigRef, _Mapping]] = ..., canvas_height: _Optional[int] = ..., canvas_width: _Optional[int] = ..., gt_boxes: _Optional[_Union[Tensor, _Mapping]] = ..., gt_counts: _Optional[_Iterable[int]] = ..., gt_classes: _Optional[_Union[Tensor, _Mapping]] = ..., ignore_boxes: _Optional[_Union[Tensor, _Mapping]] = ..., ignore_counts: _Optional[_Iterable[int]] = ..., image_sizes: _Optional[_Union[Tensor, _Mapping]] = ..., drop_invalid: _Optional[bool] = ..., format: _Optional[_Union[Format, str]] = ..., delta_dtype: _Optional[_Union[DType, str]] = ..., return_classes: _Optional[bool] = ..., return_max_iou: _Optional[bool] = ..., seed: _Optional[int] = ..., pad_sizes: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DenseTargets(_message.Message):
    __slots__ = ("labels", "matched_gt", "deltas", "classes")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_GT_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    labels: Tensor
    matched_gt: Tensor
    deltas: Tensor
    classes: Tensor
    def __init__(self, labels: _Optional[_Union[Tensor, _Mapping]] = ..., matched_gt: _Optional[_Union[Tensor, _Mapping]] = ..., deltas: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SparseTargets(_message.Message):
    __slots__ = ("positive_offsets", "positive_anchors", "positive_matched_gt", "positive_deltas", "positive_classes", "listed_label", "listed_offsets", "listed_anchors", "unlisted_label")
    POSITIVE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_MATCHED_GT_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_DELTAS_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LISTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    LISTED_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LISTED_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    UNLISTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    positive_offsets: Tensor
    positive_anchors: Tensor
    positive_matched_gt: Tensor
    positive_deltas: Tensor
    positive_classes: Tensor
    listed_label: int
    listed_offsets: Tensor
    listed_anchors: Tensor
    unlisted_label: int
    def __init__(self, positive_offsets: _Optional[_Union[Tensor, _Mapping]] = ..., positive_anchors: _Optional[_Union[Tensor, _Mapping]] = ..., positive_matched_gt: _Optional[_Union[Tensor, _Mapping]] = ..., positive_deltas: _Optional[_Union[Tensor, _Mapping]] = ..., positive_classes: _Optional[_Union[Tensor, _Mapping]] = ..., listed_label: _Optional[int] = ..., listed_offsets: _Optional[_Union[Tensor, _Mapping]] = ..., listed_anchors: _Optional[_Union[Tensor, _Mapping]] = ..., unlisted_label: _Optional[int] = ...) -> None: ...

class DroppedBoxes(_message.Message):
    __slots__ = ("box_index", "ignore_box_index")
    BOX_INDEX_FIELD_NUMBER: _ClassVar[int]
    IGNORE_BOX_INDEX_FIELD_NUMBER: _ClassVar[int]
    box_index: _containers.RepeatedScalarFieldContainer[int]
    ignore_box_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, box_index: _Optional[_Iterable[int]] = ..., ignore_box_index: _Optional[_Iterable[int]] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "field_violations")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field_violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ...) -> None: ...

class AssignResponse(_message.Message):
    __slots__ = ("request_id", "batch_size", "num_anchors", "background_class", "dense", "sparse", "max_iou", "dropped", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_CLASS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    MAX_IOU_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    batch_size: int
    num_anchors: int
    background_class: int
    dense: DenseTargets
    sparse: SparseTargets
    max_iou: Tensor
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedBoxes]
    error: RequestError
    def __init__(self, request_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., num_anchors: _Optional[int] = ..., background_class: _Optional[int] = ..., dense: _Optional[_Union[DenseTargets, _Mapping]] = ..., sparse: _Optional[_Union[SparseTargets, _Mapping]] = ..., max_iou: _Optional[_Union[Tensor, _Mapping]] = ..., dropped: _Optional[_Iterable[_Union[DroppedBoxes, _Mapping]]] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class ListPresetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Preset(_message.Message):
    __slots__ = ("name", "description", "config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    config_json: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class ListPresetsResponse(_message.Message):
    __slots__ = ("presets",)
    PRESETS_FIELD_NUMBER: _ClassVar[int]
    presets: _containers.RepeatedCompositeFieldContainer[Preset]
    def __init__(self, presets: _Optional[_Iterable[_Union[Preset, _Mapping]]] = ...) -> None: ...

class GetAnchorsRequest(_message.Message):
    __slots__ = ("config", "canvas_height", "canvas_width")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CANVAS_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CANVAS_WIDTH_FIELD_NUMBER: _ClassVar[int]
    config: ConfigRef
    canvas_height: int
    canvas_width: int
    def __init__(self, config: _Optional[_Union[ConfigRef, _Mapping]] = ..., canvas_height: _Optional[int] = ..., canvas_width: _Optional[int] = ...) -> None: ...

class GetAnchorsResponse(_message.Message):
    __slots__ = ("anchors",)
    ANCHORS_FIELD_NUMBER: _ClassVar[int]
    anchors: Tensor
    def __init__(self, anchors: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
