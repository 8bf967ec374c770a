"""Shared pieces for the export and serving tests: a tiny trained classifier,
the test split's encoded images, and a session-wide exported model.

Register the fixtures in a test module with ``pytest_plugins = ["serving_fixtures"]``:
a plugin is registered once, so the session fixtures are built once per run
(importing them into several modules would make one copy per module).
The model is a few layers on 32x32 inputs trained for a few steps on the
``tfrecord_data`` fixture so that its predictions are not uniform.

PYTEST_DONT_REWRITE (test modules import helpers from here before pytest loads it as a plugin).
"""

from __future__ import annotations

import pathlib

import pytest

IMAGE_SIZE = (32, 32)


def read_split(data_dir: pathlib.Path, split: str) -> tuple[list[bytes], list[int]]:
    """Encoded images and label ids of one split of a contract data folder."""
    import tensorflow as tf

    from preprocessing import tfrecords

    images, labels = [], []
    for shard in tfrecords.list_shards(str(data_dir), split):
        for record in tf.data.TFRecordDataset(shard):
            parsed = tfrecords.parse_example(record)
            images.append(parsed[tfrecords.ENCODED].numpy())
            labels.append(int(parsed[tfrecords.LABEL].numpy()))
    return images, labels


def build_tiny_model(data_dir: pathlib.Path, *, seed: int = 0, steps: int = 30):
    """A small softmax classifier (float32 [N,32,32,3] in [0,255]) fitted briefly on the train split."""
    import keras
    import numpy as np
    import tensorflow as tf

    from preprocessing import tfrecords

    labels = tfrecords.read_labels(str(data_dir))
    images, ids = read_split(data_dir, "train")
    pixels = np.stack([tfrecords.decode_and_resize(tf.constant(i), IMAGE_SIZE).numpy() for i in images])
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((*IMAGE_SIZE, 3)),
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(labels), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    model.fit(pixels, np.array(ids), batch_size=len(ids), epochs=steps, verbose=0)
    return model, labels


@pytest.fixture(scope="session")
def tiny_model(tfrecord_data):
    """``(model, labels)``."""
    return build_tiny_model(tfrecord_data)


@pytest.fixture(scope="session")
def split_images(tfrecord_data) -> dict[str, list[bytes]]:
    """Encoded images per split of ``tfrecord_data``."""
    return {split: read_split(tfrecord_data, split)[0] for split in ("train", "validation", "test")}


def float16_ops(version_dir: pathlib.Path) -> list[str]:
    """Names of the SavedModel's ops (graph and function library) with a float16 type attribute."""
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((pathlib.Path(version_dir) / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]

    def half(attr) -> bool:
        return attr.type == types_pb2.DT_HALF or types_pb2.DT_HALF in attr.list.type

    return sorted({node.op for node in nodes if any(half(a) for a in node.attr.values())})


def export_tiny(model, labels, base: pathlib.Path, images: list[bytes], **kwargs):
    from trainer.publish.export import export_model

    return export_model(model, str(base), labels=labels, image_size=IMAGE_SIZE, resize_mode="stretch",
                        check_images=images, metadata={"test": True}, **kwargs)


@pytest.fixture(scope="session")
def exported_base(tiny_model, split_images, tmp_path_factory) -> pathlib.Path:
    """An export base holding version 1 of the tiny model (do not add versions to it)."""
    model, labels = tiny_model
    base = tmp_path_factory.mktemp("export")
    export_tiny(model, labels, base, split_images["test"])
    return base


def start_server(base: pathlib.Path, **overrides):
    """A started in-process development server on free 127.0.0.1 ports (use as a context manager)."""
    from serving.server import ModelServer, ServerConfig

    settings = dict(model_base_path=str(base), model_name="classifier", port=0, rest_port=0,
                    file_system_poll_wait_seconds=0.2, drain_seconds=5)
    settings.update(overrides)
    return ModelServer(ServerConfig(**settings))


@pytest.fixture(scope="session")
def serving_server(exported_base):
    """The development server on ``exported_base`` with batching on, labels stable=1 and canary=2 (not loaded)."""
    server = start_server(exported_base, version_labels={"stable": 1, "canary": 2}, enable_batching=True,
                          max_batch_size=8, batch_timeout_micros=1000, max_message_bytes=8 * 1024 * 1024)
    server.start()
    yield server
    server.stop(grace=5)


@pytest.fixture(scope="session")
def grpc_target(serving_server) -> str:
    return f"127.0.0.1:{serving_server.port}"


@pytest.fixture(scope="session")
def expected_outputs(exported_base, split_images):
    """What the SavedModel itself returns for the test images (the reference for every transport)."""
    from trainer.publish.export import load_predict_fn

    return load_predict_fn(str(exported_base / "1"))(split_images["test"])
