"""Which Beam runner runs the job, and with what options.

With no ``--runner`` (or ``--runner DirectRunner``) the job runs on Beam's
FnApiRunner in ``multi_processing`` mode with one worker process per core.
It is picked explicitly because Beam 2.77's ``DirectRunner`` name first tries
the Prism runner, which downloads a Go binary at run time (impossible offline).
Its worker processes run Beam's SDK harness through :mod:`preprocessing.worker`,
which sets up their console logging first, starts them early (standbys that
import Beam while the driver builds the pipeline) and lets them exit at once
when the harness is done.
Any other ``--runner`` (DataflowRunner, FlinkRunner, SparkRunner, PrismRunner
...) and every other Beam option pass straight through to ``PipelineOptions``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions
from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import fn_runner

from preprocessing import worker
from preprocessing.worker import LOCAL_RUNNER_NAMES, TRACEBACKS_LOGGER, available_cores  # noqa: F401 - re-exported

# Workers log our progress; Beam's start-up chatter in each worker is noise to a person watching, and so
# are its tracebacks of a failed bundle (sdk_worker, common): the driver raises the same error, which the
# CLI turns into one line (the whole traceback with --verbose).
_WORKER_LOG_LEVELS = {"preprocessing": "INFO", "__main__": "ERROR", "apache_beam.runners.worker.sdk_worker_main": "ERROR",
                      "apache_beam.options.pipeline_options": "ERROR",
                      "apache_beam.runners.worker.sdk_worker": "CRITICAL", "apache_beam.runners.common": "CRITICAL"}
# The worker command FnApiRunner's multi_processing mode starts, and ours (the same harness, quieter logs).
_BEAM_WORKER_MODULE = b" -m apache_beam.runners.worker.sdk_worker_main"
_WORKER_MODULE = b" -m preprocessing.worker"


@dataclass
class RunnerChoice:
    """The runner instance (or name) and options to build the ``beam.Pipeline`` with."""

    runner: object
    options: PipelineOptions
    description: str
    local: bool
    lanes: int = 0  # the local multi-process runner's workers: see preprocessing.pipeline (Lanes)


def _has_flag(args: list[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def _without_flag(args: list[str], name: str) -> list[str]:
    """``args`` minus ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def unknown_flags(beam_args: list[str]) -> list[str]:
    """The flags in ``beam_args`` that no Beam ``PipelineOptions`` class defines (as typed, e.g. ``--image-szie``).

    Beam itself only logs "Discarding unparseable args" and runs on, so a
    mistyped flag of ours would silently fall back to its default. Compared
    with public API only: the options Beam parses with and without keeping
    the unknown ones.
    """
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)
    try:
        options = PipelineOptions(list(beam_args))
        unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    finally:
        beam_log.setLevel(level)
    flags = [arg for arg in beam_args if arg.startswith("-")]
    return [flag.split("=", 1)[0] for flag in flags
            if flag.lstrip("-").split("=", 1)[0].replace("-", "_") in unknown]


def choose_runner(beam_args: list[str]) -> RunnerChoice:
    """Build the runner and options from the Beam flags the CLI did not consume."""
    args = list(beam_args)
    options = PipelineOptions(args)
    requested = (options.view_as(StandardOptions).runner or "").strip()
    if requested.lower() not in LOCAL_RUNNER_NAMES:
        options.view_as(SetupOptions).save_main_session = False
        return RunnerChoice(runner=None, options=options, description=requested, local=False)

    if not _has_flag(args, "--direct_running_mode"):
        args.append("--direct_running_mode=multi_processing")
    if not _has_flag(args, "--direct_num_workers"):
        in_memory = PipelineOptions(args).view_as(DirectOptions).direct_running_mode == "in_memory"
        args.append(f"--direct_num_workers={1 if in_memory else available_cores()}")
    if not _has_flag(args, "--default_sdk_harness_log_level"):
        args.append("--default_sdk_harness_log_level=WARNING")
    if not _has_flag(args, "--sdk_harness_log_level_overrides"):
        beam_logs = logging.getLogger("apache_beam").isEnabledFor(logging.INFO)  # the driver's --verbose
        levels = {**_WORKER_LOG_LEVELS, TRACEBACKS_LOGGER: "DEBUG" if beam_logs else "INFO"}
        args.append("--sdk_harness_log_level_overrides=" + json.dumps(levels))
    args = _without_flag(args, "--runner")
    options = PipelineOptions(args)
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        worker.make_package_importable()
    description = f"FnApiRunner ({direct.direct_running_mode}, {direct.direct_num_workers} workers)"
    several = direct.direct_running_mode == "multi_processing" and direct.direct_num_workers > 1
    return RunnerChoice(runner=_fn_api_runner(options), options=options, description=description, local=True,
                        lanes=direct.direct_num_workers if several else 0)


def _fn_api_runner(options: PipelineOptions):
    """A FnApiRunner whose workers see the pipeline options (their log levels among them).

    The same provisioning Beam's own DirectRunner does before it hands a
    batch pipeline to the FnApiRunner.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return LocalRunner(provision_info=info)


class LocalRunner(fn_runner.FnApiRunner):
    """Beam's FnApiRunner whose worker processes start with :mod:`preprocessing.worker`.

    That module runs Beam's own SDK harness after setting up the worker's
    console logging (no bootstrap INFO lines, no "apitools not found"); when
    standby workers are running (:func:`preprocessing.worker.start_standby`)
    the command hands each worker to one of them instead of starting a new
    Python. The runner hard-codes its worker command line for
    ``multi_processing``, so the command is swapped in the pipeline proto it
    is about to run.
    """

    def run_via_runner_api(self, pipeline_proto, options):
        standby = worker.standby_command()
        for environment in pipeline_proto.components.environments.values():
            if environment.urn == python_urns.SUBPROCESS_SDK and environment.payload.endswith(_BEAM_WORKER_MODULE):
                if standby:
                    environment.payload = standby.encode()
                else:
                    environment.payload = environment.payload[: -len(_BEAM_WORKER_MODULE)] + _WORKER_MODULE
        return super().run_via_runner_api(pipeline_proto, options)
