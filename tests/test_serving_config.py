"""serving/config/: the real TF Serving's config files parse with TF Serving's protos and agree with the project."""

from __future__ import annotations

import pathlib

import pytest
from google.protobuf import text_format
from serving_fixtures import start_server
from tensorflow_serving.config import model_server_config_pb2

from serving import protos
from serving.batching import BatchingConfig
from serving.client import PredictionClient
from serving.metrics import PROMETHEUS_PATH

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "serving" / "config"


def test_models_config_is_a_model_server_config_for_the_classifier():
    config = text_format.Parse((CONFIG / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("classifier", "/models/classifier", "tensorflow")
    # serving.release rewrites it: exactly the labelled versions are served (a new export changes nothing).
    assert model.model_version_policy.WhichOneof("policy_choice") == "specific"
    assert sorted(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1, "canary": 2}


def test_batching_config_is_batching_parameters_the_dev_server_reads():
    params = protos.parse_text((CONFIG / "batching.config").read_text(), protos.BatchingParameters())
    assert params.max_batch_size.value == 32 and params.batch_timeout_micros.value == 2000
    assert params.num_batch_threads.value >= 1 and params.max_enqueued_batches.value >= 1
    assert BatchingConfig.from_file(str(CONFIG / "batching.config")) == BatchingConfig(
        max_batch_size=32, batch_timeout_micros=2000, num_batch_threads=4, max_enqueued_batches=100)


def test_monitoring_config_enables_prometheus_at_the_path_the_dev_server_uses():
    config = protos.parse_text((CONFIG / "monitoring.config").read_text(), protos.MonitoringConfig())
    assert config.prometheus_config.enable is True
    assert config.prometheus_config.path == PROMETHEUS_PATH


def test_a_misspelt_field_is_rejected_by_the_protos():
    with pytest.raises(text_format.ParseError):
        protos.parse_text("max_batch_sise { value: 32 }", protos.BatchingParameters())


def test_the_guide_names_every_file_and_flag():
    guide = (CONFIG / "README.md").read_text()
    for needle in ("models.config", "batching.config", "monitoring.config", "--model_config_file",
                   "--batching_parameters_file", "--monitoring_config_file", "--enable_batching",
                   "docker run", "readinessProbe"):
        assert needle in guide


def test_the_dev_server_runs_from_models_config_and_batching_config(exported_base, split_images):
    with start_server(exported_base, model_base_path=str(exported_base), model_config_file=str(CONFIG / "models.config"),
                      enable_batching=True, batching_parameters_file=str(CONFIG / "batching.config"),
                      rest_port=-1) as server:
        assert server.manager.labels == {"stable": 1, "canary": 2}
        with PredictionClient(f"127.0.0.1:{server.port}", version_label="stable") as client:
            assert client.predict(split_images["test"][:1])[0].model_version == 1
