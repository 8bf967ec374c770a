"""Runner choice: local multi-process FnApiRunner by default, anything else passed through to Beam."""

from __future__ import annotations

from apache_beam.options.pipeline_options import DirectOptions, GoogleCloudOptions, StandardOptions

from preprocessing import runners


def test_default_is_the_multi_process_fn_api_runner_with_one_worker_per_core():
    choice = runners.choose_runner([])
    direct = choice.options.view_as(DirectOptions)
    assert choice.local and type(choice.runner).__name__ == "FnApiRunner"
    assert direct.direct_running_mode == "multi_processing"
    assert direct.direct_num_workers == runners.available_cores()


def test_direct_runner_name_does_not_go_through_prism():
    choice = runners.choose_runner(["--runner", "DirectRunner", "--direct_num_workers=3"])
    assert type(choice.runner).__name__ == "FnApiRunner"
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
