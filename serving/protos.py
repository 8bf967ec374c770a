"""TF Serving config messages that ``tensorflow-serving-api`` does not ship.

The pip package carries ``ModelServerConfig`` (``tensorflow_serving.config``)
but not ``BatchingParameters`` (``servables/tensorflow/session_bundle_config.proto``)
nor ``MonitoringConfig`` (``config/monitoring_config.proto``), the formats of
``--batching_parameters_file`` and ``--monitoring_config_file``. This module
declares those two messages with TF Serving's package, field names and
numbers, in a private descriptor pool, so the project can parse and check its
config files with ``text_format`` exactly as the server would.
"""

from __future__ import annotations

import functools

_PACKAGE = "tensorflow.serving"


@functools.lru_cache(maxsize=None)
def _pool():
    from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    F = descriptor_pb2.FieldDescriptorProto

    def message(file_proto, name, fields):
        msg = file_proto.message_type.add(name=name)
        for number, (field_name, kind, type_name, label) in enumerate(fields, start=1):
            if field_name is None:
                continue
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    int64v, boolv, strv = ".google.protobuf.Int64Value", ".google.protobuf.BoolValue", ".google.protobuf.StringValue"
    batching = descriptor_pb2.FileDescriptorProto(
        name="tlp/tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package=_PACKAGE, syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message(batching, "BatchingParameters", [
        ("max_batch_size", F.TYPE_MESSAGE, int64v, opt),
        ("batch_timeout_micros", F.TYPE_MESSAGE, int64v, opt),
        ("max_enqueued_batches", F.TYPE_MESSAGE, int64v, opt),
        ("num_batch_threads", F.TYPE_MESSAGE, int64v, opt),
        ("thread_pool_name", F.TYPE_MESSAGE, strv, opt),
        ("allowed_batch_sizes", F.TYPE_INT64, None, rep),
        ("pad_variable_length_inputs", F.TYPE_BOOL, None, opt),
        ("enable_large_batch_splitting", F.TYPE_MESSAGE, boolv, opt),
        ("max_execution_batch_size", F.TYPE_MESSAGE, int64v, opt),
    ])
    pool.Add(batching)
    monitoring = descriptor_pb2.FileDescriptorProto(
        name="tlp/tensorflow_serving/config/monitoring_config.proto", package=_PACKAGE, syntax="proto3")
    message(monitoring, "PrometheusConfig", [
        ("enable", F.TYPE_BOOL, None, opt),
        ("path", F.TYPE_STRING, None, opt),
    ])
    message(monitoring, "MonitoringConfig", [
        ("prometheus_config", F.TYPE_MESSAGE, f".{_PACKAGE}.PrometheusConfig", opt),
    ])
    pool.Add(monitoring)
    return pool


def _message_class(name: str):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"{_PACKAGE}.{name}"))


def BatchingParameters():  # noqa: N802 - mirrors the proto message name
    """A new ``tensorflow.serving.BatchingParameters`` message."""
    return _message_class("BatchingParameters")()


def MonitoringConfig():  # noqa: N802
    """A new ``tensorflow.serving.MonitoringConfig`` message."""
    return _message_class("MonitoringConfig")()


def parse_text(text: str, message):
    """``text_format.Parse`` into ``message`` (raises ``text_format.ParseError`` on a bad file)."""
    from google.protobuf import text_format

    return text_format.Parse(text, message)
