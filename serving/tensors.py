"""``tensorflow.TensorProto`` <-> numpy without calling TensorFlow's Python API.

Both ends use this: the client packs encoded images into a DT_STRING tensor
and reads the response, the server unpacks requests and packs outputs. Values
are written to the typed repeated fields (``float_val``, ``int64_val``,
``string_val``...), which is what TF Serving's Predict does by default
(``AsProtoField``); reading accepts both those fields and ``tensor_content``,
so responses from the real server and from ``tf.make_tensor_proto`` work.

Why not ``tf.make_tensor_proto`` / ``tf.make_ndarray``? Not to keep TensorFlow
out of the client: ``tensorflow_serving.apis`` imports TensorFlow's framework
protos, which import all of TensorFlow, so it is loaded on both ends anyway.
The reasons are what they would change (checked against TensorFlow 2.21):

* ``tf.make_tensor_proto`` packs numbers into ``tensor_content`` (raw bytes),
  never into ``float_val`` and the like, so the development server's Predict
  responses would stop matching TF Serving's on the wire
  (``tests/test_serving_tfs_parity.py``);
* ``tf.make_ndarray`` answers a malformed request with ``ValueError: index
  can't contain negative values`` (too many values for the shape) or a bare
  ``KeyError: 20`` (an unsupported dtype); :class:`TensorError` names the
  shape, the count or the dtype, and the server returns it as
  INVALID_ARGUMENT;
* both are slower here: 190 us against 51 us to pack 32 encoded images, 77 us
  against 45 us to read a float [32, 10] response.

For valid tensors the two agree (``tests/test_serving_grpc.py`` sends requests
built with ``tf.make_tensor_proto``), including TensorFlow's rule of repeating
the last value to fill the shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# DataType enum values (tensorflow/core/framework/types.proto).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23

_NUMPY = {
    DT_FLOAT: np.float32, DT_DOUBLE: np.float64, DT_INT32: np.int32, DT_UINT8: np.uint8,
    DT_INT16: np.int16, DT_INT8: np.int8, DT_INT64: np.int64, DT_BOOL: np.bool_,
    DT_UINT16: np.uint16, DT_HALF: np.float16, DT_UINT32: np.uint32, DT_UINT64: np.uint64,
}
_FIELD = {
    DT_FLOAT: "float_val", DT_DOUBLE: "double_val", DT_INT32: "int_val", DT_UINT8: "int_val",
    DT_INT16: "int_val", DT_INT8: "int_val", DT_INT64: "int64_val", DT_BOOL: "bool_val",
    DT_UINT16: "int_val", DT_HALF: "half_val", DT_UINT32: "uint32_val", DT_UINT64: "uint64_val",
    DT_STRING: "string_val",
}
NAMES = {
    DT_FLOAT: "float", DT_DOUBLE: "double", DT_INT32: "int32", DT_UINT8: "uint8", DT_INT16: "int16",
    DT_INT8: "int8", DT_STRING: "string", DT_INT64: "int64", DT_BOOL: "bool", DT_UINT16: "uint16",
    DT_HALF: "half", DT_UINT32: "uint32", DT_UINT64: "uint64",
}


class TensorError(ValueError):
    """A TensorProto that cannot be read as an array (unsupported dtype, wrong value count)."""


def dtype_name(dtype: int) -> str:
    return NAMES.get(dtype, f"dtype {dtype}")


def dtype_of(array: np.ndarray) -> int:
    """The DataType enum of a numpy array (object/bytes/str arrays are DT_STRING)."""
    if array.dtype.kind in ("O", "S", "U"):
        return DT_STRING
    for enum, np_type in _NUMPY.items():
        if array.dtype == np_type:
            return enum
    raise TensorError(f"unsupported numpy dtype {array.dtype}")


def to_proto(value: Any, dtype: int | None = None, proto=None):
    """A numpy array (or list) as a TensorProto; strings as bytes in ``string_val``."""
    from tensorflow.core.framework import tensor_pb2

    proto = proto if proto is not None else tensor_pb2.TensorProto()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (bytes, str)):
        value = np.array(value, dtype=object)
    array = np.asarray(value)
    dtype = dtype if dtype is not None else dtype_of(array)
    proto.dtype = dtype
    for size in array.shape:
        proto.tensor_shape.dim.add().size = int(size)
    flat = array.reshape(-1)
    if dtype == DT_STRING:
        proto.string_val.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in flat)
    elif dtype == DT_HALF:
        proto.half_val.extend(flat.astype(np.float16).view(np.uint16).tolist())
    elif dtype in _FIELD:
        getattr(proto, _FIELD[dtype]).extend(flat.astype(_NUMPY[dtype]).tolist())
    else:
        raise TensorError(f"unsupported dtype {dtype}")
    return proto


def from_proto(proto) -> np.ndarray:
    """A TensorProto as a numpy array (DT_STRING gives an object array of bytes)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise TensorError(f"tensor shape {shape} has a negative dimension")
    count = int(np.prod(shape)) if shape else 1
    dtype = proto.dtype
    if dtype == DT_STRING:
        values = np.empty(len(proto.string_val), dtype=object)
        values[:] = list(proto.string_val)
    elif dtype in _NUMPY:
        np_type = _NUMPY[dtype]
        if proto.tensor_content:
            values = np.frombuffer(proto.tensor_content, dtype=np_type)
        elif dtype == DT_HALF:
            values = np.array(proto.half_val, dtype=np.uint16).view(np.float16)
        else:
            values = np.array(getattr(proto, _FIELD[dtype]), dtype=np_type)
    else:
        raise TensorError(f"unsupported dtype {dtype_name(dtype)}")
    if values.size == count:
        return values.reshape(shape)
    if values.size == 0:
        return np.zeros(shape, dtype=values.dtype) if dtype != DT_STRING else np.full(shape, b"", dtype=object)
    if values.size < count:  # TensorFlow repeats the last value to fill the shape
        values = np.concatenate([values, np.repeat(values[-1:], count - values.size)])
        return values.reshape(shape)
    raise TensorError(f"tensor has {values.size} values but shape {shape} holds {count}")
