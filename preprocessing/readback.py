"""Read a finished data folder back: records as Python dicts, errors and stats.

For tests, the benchmark and people checking a run by hand; training reads
the records with ``tf.data`` and :mod:`preprocessing.tfrecords` instead.
"""

from __future__ import annotations

import json
import os

from preprocessing import tfrecords


def read_records(data_dir: str, split: str) -> list[dict]:
    """Every record of one split, keys as in the contract, values as Python scalars / bytes."""
    import tensorflow as tf

    shards = tfrecords.list_shards(data_dir, split)
    records = []
    for serialized in tf.data.TFRecordDataset(shards):
        parsed = tfrecords.parse_example(serialized)
        record = {key: value.numpy() for key, value in parsed.items()}
        for key in (tfrecords.FORMAT, tfrecords.TEXT, tfrecords.SOURCE_ID, tfrecords.SHA256):
            record[key] = record[key].decode("utf-8")
        for key in (tfrecords.HEIGHT, tfrecords.WIDTH, tfrecords.LABEL):
            record[key] = int(record[key])
        records.append(record)
    return records


def read_errors(data_dir: str) -> list[dict]:
    """The rejected inputs of ``errors.jsonl``."""
    with open(os.path.join(data_dir, tfrecords.ERRORS_FILE), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_stats(data_dir: str) -> dict:
    """``stats.json`` as a dict."""
    with open(os.path.join(data_dir, tfrecords.STATS_FILE), encoding="utf-8") as handle:
        return json.load(handle)
