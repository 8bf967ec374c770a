"""REST request and response bodies: TF Serving's JSON <-> the arrays ServingCore takes and returns.

As TF Serving's json_tensor.cc reads and writes them: row format
``{"instances": [...]}`` answered with ``{"predictions": [...]}``, columnar
``{"inputs": ...}`` answered with ``{"outputs": ...}``; binary values travel
as ``{"b64": "..."}``, outputs whose name ends in ``_bytes`` come back that way,
other strings as text. A body that does not parse is INVALID_ARGUMENT with
rapidjson's message and offset; JSON values quoted in errors are printed as
rapidjson's PrettyWriter prints them. No HTTP here: that is :mod:`serving.rest`.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from serving import tensors
from serving.errors import ServingError, invalid


def _always_print_option() -> dict:
    """TF Serving prints with always_print_fields_with_no_presence; the keyword's name depends on protobuf."""
    import inspect

    from google.protobuf import json_format

    names = inspect.signature(json_format.MessageToDict).parameters
    if "always_print_fields_with_no_presence" in names:  # protobuf >= 5.26
        return {"always_print_fields_with_no_presence": True}
    return {"including_default_value_fields": True}


ALWAYS_PRINT = _always_print_option()


def _decode_value(value):
    """JSON to Python, turning ``{"b64": ...}`` into bytes and text into UTF-8 bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (ValueError, TypeError) as exc:
                raise invalid(f"Unable to base64 decode: {exc}") from exc
        raise invalid("JSON object other than {\"b64\": ...} is not a valid tensor value")
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_array(alias: str, value, dtype: int) -> np.ndarray:
    value = _decode_value(value)
    try:
        if dtype == tensors.DT_STRING:
            array = np.array(value, dtype=object)
            if any(not isinstance(v, bytes) for v in array.reshape(-1)):
                raise invalid(f"input {alias} expects strings (or {{\"b64\": ...}}) but got other JSON values")
            return array
        return np.array(value, dtype=tensors._NUMPY[dtype])
    except ServingError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise invalid(f"input {alias} cannot be read as {tensors.dtype_name(dtype)}: {exc}") from exc


def inputs_from_json(body: dict, signature) -> tuple[dict[str, np.ndarray], bool]:
    """The request's inputs as arrays typed by the signature; True when it used the row format."""
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    if "instances" in body and "inputs" in body:
        raise invalid("Not both 'instances' and 'inputs' can be specified in the request")
    dtypes = {alias: info.dtype for alias, info in signature.inputs.items()}
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise invalid("'instances' must be a non-empty JSON list")
        named = all(isinstance(r, dict) and set(r) != {"b64"} for r in rows)
        if named:
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise invalid("Every instance must name the same inputs")
            columns = {k: [r[k] for r in rows] for k in keys}
        else:
            if len(dtypes) != 1:
                raise invalid(f"The signature has {len(dtypes)} inputs; instances must be JSON objects naming them")
            columns = {next(iter(dtypes)): rows}
        row_format = True
    elif "inputs" in body:
        given = body["inputs"]
        if isinstance(given, dict) and set(given) != {"b64"}:
            columns = dict(given)
        else:
            if len(dtypes) != 1:
                raise invalid(f"The signature has {len(dtypes)} inputs; 'inputs' must be a JSON object naming them")
            columns = {next(iter(dtypes)): given}
        row_format = False
    else:
        raise invalid("Missing 'inputs' or 'instances' key")
    arrays = {}
    for alias, value in columns.items():
        if alias not in dtypes:
            arrays[alias] = np.array([0])  # let validation name the extra input as TF Serving does
            continue
        arrays[alias] = _to_array(alias, value, dtypes[alias])
    return arrays, row_format


def _json_value(alias: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        if alias.endswith("_bytes"):
            convert = lambda v: {"b64": base64.b64encode(v).decode("ascii")}  # noqa: E731
        else:
            convert = lambda v: v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)  # noqa: E731
        return np.vectorize(convert, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def outputs_to_json(outputs: dict[str, np.ndarray], row_format: bool):
    if not row_format:
        if len(outputs) == 1:
            alias, value = next(iter(outputs.items()))
            return {"outputs": _json_value(alias, value)}
        return {"outputs": {alias: _json_value(alias, value) for alias, value in outputs.items()}}
    values = {alias: _json_value(alias, value) for alias, value in outputs.items()}
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    rows = len(next(iter(values.values())))
    return {"predictions": [{alias: values[alias][i] for alias in values} for i in range(rows)]}


def debug_json(value, indent: int = 0) -> str:
    """A JSON value as TF Serving quotes it in errors (rapidjson PrettyWriter, single-line arrays)."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        pad = " " * (indent + 4)
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {debug_json(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list):
        return "[" + ", ".join(debug_json(v, indent) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def parse_json(raw: bytes):
    """The request body as TF Serving's ParseJson reads it (json_tensor.cc): a JSON object, else INVALID_ARGUMENT."""
    if not raw:
        raise invalid("JSON Parse error: The document is empty")
    try:
        text = raw.decode("utf-8")
        start = len(text) - len(text.lstrip(" \t\r\n"))
        if start == len(text):
            raise invalid(f"JSON Parse error: The document is empty. at offset: {start}")
        body, _ = json.JSONDecoder().raw_decode(text, start)  # kParseStopWhenDoneFlag: trailing text ignored
    except UnicodeDecodeError as exc:
        raise invalid(f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise invalid(f"JSON Parse error: {_RAPIDJSON_MESSAGES.get(exc.msg, 'Invalid value.')} "
                      f"at offset: {exc.pos}") from exc
    if not isinstance(body, dict):
        raise invalid(f"JSON Value: {debug_json(body)} Is not object")
    if "signature_name" in body and not isinstance(body["signature_name"], str):
        raise invalid(f"JSON Value: {debug_json(body)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    return body


_RAPIDJSON_MESSAGES = {  # Python's json messages -> rapidjson's GetParseError_En
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
}
