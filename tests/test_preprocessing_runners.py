"""Runner choice: local multi-process FnApiRunner by default, anything else passed through to Beam."""

from __future__ import annotations

import pytest
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


def test_with_standby_workers_the_runner_hands_each_worker_to_one(monkeypatch):
    from apache_beam.portability.api import beam_runner_api_pb2

    from preprocessing import worker

    proto = beam_runner_api_pb2.Pipeline()
    env = proto.components.environments["e"]
    env.urn, env.payload = "beam:env:harness_subprocess_python:v1", b"/x/python -m apache_beam.runners.worker.sdk_worker_main"
    monkeypatch.setattr(worker, "standby_command", lambda: "/x/python -S /y/worker.py --attach /tmp/standby")
    monkeypatch.setattr(FnApiRunner, "run_via_runner_api", lambda self, pipeline_proto, options: pipeline_proto)
    ran = runners.choose_runner([]).runner.run_via_runner_api(proto, None)
    assert ran.components.environments["e"].payload == b"/x/python -S /y/worker.py --attach /tmp/standby"


@pytest.mark.parametrize("args, expected", [
    ([], "cores"), (["--direct_num_workers=3"], 3), (["--direct_num_workers", "2"], 2),
    (["--runner", "DirectRunner", "--direct_num_workers=2"], 2), (["--runner=DataflowRunner"], 0),
    (["--direct_running_mode=in_memory"], 0), (["--direct_running_mode", "multi_threading"], 0),
])
def test_standby_workers_are_started_for_the_local_multi_process_runner_only(args, expected):
    from preprocessing import worker

    assert worker.local_workers(args) == (runners.available_cores() if expected == "cores" else expected)


def test_no_standby_workers_with_another_beam_version(monkeypatch):
    from importlib import metadata

    from preprocessing import worker

    monkeypatch.setattr(metadata, "version", lambda name: "2.99.0")
    worker.start_standby(2)
    assert worker.standby_command() is None


def _photos(root, count=12):
    import numpy as np
    from PIL import Image

    for index in range(count):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("fork", [False, True], ids=["new processes", "forked"])
def test_a_local_run_on_standby_workers_leaves_no_process_or_folder_behind(tmp_path, repo_root, fork):
    """job.run from a library starts its standbys as new processes; the CLI, as the program, forks them.

    (Forking is exercised in a child process: this test process has other threads.)
    """
    import glob
    import subprocess
    import sys
    import tempfile

    photos = _photos(tmp_path / "photos")
    out = tmp_path / "data"
    code = (
        "import glob, os, sys, tempfile\n"
        "from preprocessing import worker\n"
        "from preprocessing.config import PreprocessConfig\n"
        "from preprocessing.job import run\n"
        f"worker.start_standby(2, fork={fork})\n"
        "standby = worker._standby\n"
        "assert standby is not None and len(standby.forked if standby.forked else standby.processes) == 2\n"
        f"assert bool(standby.forked) == {fork}\n"
        f"stats = run(PreprocessConfig(input={str(photos)!r}, output={str(out)!r}, image_size=(8, 8), "
        "progress_seconds=0), ['--direct_num_workers=2'])\n"
        "assert stats['totals']['written'] == 12 and 'multi_processing' in stats['run']['runner']\n"
        "assert worker._standby is None and not os.path.exists(standby.folder)\n"
        "assert all(p.poll() is not None for p in standby.processes)\n"
        "for pid in standby.forked:\n"
        "    try:\n"
        "        os.waitpid(pid, os.WNOHANG)\n"
        "        raise AssertionError('a forked standby was not reaped')\n"
        "    except ChildProcessError:\n"
        "        pass\n"
    )
    before = set(glob.glob(f"{tempfile.gettempdir()}/preprocessing-workers-*"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(glob.glob(f"{tempfile.gettempdir()}/preprocessing-workers-*")) <= before


def test_a_killed_drivers_standby_folder_is_removed_by_the_next_run(monkeypatch):
    """A driver killed with SIGKILL leaves its standby folder (sockets, markers); the next run on the host removes it."""
    import os
    import subprocess
    import sys
    import tempfile

    from preprocessing import owners, worker

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tempfile.mkdtemp(prefix=f"{worker.FOLDER_PREFIX}{owners.host()}~{gone.stdout.strip()}-")
    running = tempfile.mkdtemp(prefix=f"{worker.FOLDER_PREFIX}{owners.host()}~{os.getppid()}-")
    unowned = tempfile.mkdtemp(prefix=worker.FOLDER_PREFIX)
    try:
        worker.start_standby(1)
        assert worker.standby_command() is not None
        assert f"{owners.owner()}-" in worker._standby.folder
        assert not os.path.exists(dead)
        assert os.path.exists(running) and os.path.exists(unowned)
    finally:
        worker.stop_standby()
        for folder in (dead, running, unowned):
            if os.path.exists(folder):
                os.rmdir(folder)


def test_beam_is_imported_without_pandas_or_bigquery_yet_both_stay_importable(repo_root):
    """Beam loads them only to offer features these jobs never use (~0.3 s and ~45 MB per process)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from preprocessing import worker\n"
        "assert worker.import_beam_lean()\n"
        "import apache_beam\n"
        "assert 'pandas' not in sys.modules and 'apache_beam.typehints.pandas_type_compatibility' not in sys.modules\n"
        "assert 'apache_beam.io.gcp.bigquery' not in sys.modules\n"
        "import pandas\n"
        "assert pandas.DataFrame({'a': [1]}).shape == (1, 1)\n"
        "from apache_beam.io.gcp import bigquery\n"
        "assert bigquery.ReadFromBigQuery\n"
        "assert not worker.import_beam_lean()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_lean_import_registers_the_same_file_systems(repo_root):
    """gs://, s3:// and the rest are registered by Beam's filesystems module, not by the IOs left out."""
    import subprocess
    import sys

    def schemes(lean: bool) -> str:
        code = (
            "from preprocessing import worker\n"
            f"assert worker.import_beam_lean() if {lean} else True\n"
            "from apache_beam.io.filesystem import FileSystem\n"
            "from apache_beam.io.filesystems import FileSystems\n"
            "print(sorted(cls.scheme() or '' for cls in FileSystem.get_all_subclasses()))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip()

    assert schemes(lean=True) == schemes(lean=False)


def test_no_process_of_the_program_imports_pandas(tmp_path, repo_root):
    """The program's driver and its local workers (forked or started by the runner) never load pandas."""
    import os
    import subprocess
    import sys

    photos = _photos(tmp_path / "photos")
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")  # every process reports each module it imports on stderr
    proc = subprocess.run([sys.executable, "-m", "preprocessing", "--input", str(photos), "--output",
                           str(tmp_path / "data"), "--image-size", "8", "--direct_num_workers=2"],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "apache_beam.runners.worker.sdk_worker_main" in imported
    assert not [name for name in imported if name.startswith("pandas.")]  # a blocked attempt logs "pandas" alone
