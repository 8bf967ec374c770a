"""Runner choice: local multi-process FnApiRunner by default, anything else passed through to Beam."""

from __future__ import annotations

from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

from preprocessing import runners


def test_default_is_the_multi_process_fn_api_runner_with_one_worker_per_core():
    choice = runners.choose_runner([])
    direct = choice.options.view_as(DirectOptions)
    assert choice.local and isinstance(choice.runner, FnApiRunner)
    assert direct.direct_running_mode == "multi_processing"
    assert direct.direct_num_workers == runners.available_cores()


def test_direct_runner_name_does_not_go_through_prism():
    choice = runners.choose_runner(["--runner", "DirectRunner", "--direct_num_workers=3"])
    assert isinstance(choice.runner, FnApiRunner)
    assert choice.options.view_as(DirectOptions).direct_num_workers == 3
    assert choice.options.view_as(StandardOptions).runner is None


def test_in_memory_mode_uses_one_worker_unless_told_otherwise():
    choice = runners.choose_runner(["--direct_running_mode=in_memory"])
    assert choice.options.view_as(DirectOptions).direct_num_workers == 1


def test_other_runners_and_their_options_pass_straight_through():
    choice = runners.choose_runner(["--runner", "DataflowRunner", "--project", "p", "--region", "europe-west1",
                                    "--temp_location", "gs://b/tmp"])
    assert not choice.local and choice.runner is None
    assert choice.options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = choice.options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == ("p", "europe-west1", "gs://b/tmp")


def test_local_workers_start_through_the_quiet_entry_point(monkeypatch):
    import logging

    from apache_beam.portability.api import beam_runner_api_pb2

    from preprocessing import worker

    proto = beam_runner_api_pb2.Pipeline()
    env = proto.components.environments["e"]
    env.urn, env.payload = "beam:env:harness_subprocess_python:v1", b"/x/python -m apache_beam.runners.worker.sdk_worker_main"
    runner = runners.choose_runner([]).runner
    # stop right where Beam's runner would run the proto
    monkeypatch.setattr(FnApiRunner, "run_via_runner_api", lambda self, pipeline_proto, options: pipeline_proto)
    ran = runner.run_via_runner_api(proto, None)
    assert ran.components.environments["e"].payload == b"/x/python -m preprocessing.worker"

    def passes(name, level, message):
        return worker.ConsoleFilter().filter(logging.LogRecord(name, level, __file__, 1, message, None, None))

    assert passes("preprocessing", logging.INFO, "listed 3 input files")
    assert passes("apache_beam.io.filesystem", logging.WARNING, "a real warning")
    assert not passes("apache_beam.runners.worker.sdk_worker_main", logging.INFO, "Logging handler created.")
    assert not passes("root", logging.WARNING, "apitools not found, and bigquery client libraries are not available")
