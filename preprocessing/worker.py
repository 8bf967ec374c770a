"""Entry point of the local runner's worker processes: Beam's SDK harness, with readable logs.

``python -m preprocessing.worker`` is what :mod:`preprocessing.runners` starts
instead of ``python -m apache_beam.runners.worker.sdk_worker_main``; it runs
that same harness. The difference is logging, set up before Beam is imported:
the worker shares the console with the driver, and Beam's harness otherwise
prints its bootstrap INFO lines ("Logging handler created.") and the import-time
"apitools not found" notice (optional GCP client libraries, unused locally)
through a default handler in the raw ``LEVEL:name:message`` format. Here the
console gets this package's own INFO lines (progress) and every WARNING or
worse from anything else, in the driver's format.

**Start-up and shut-down.** Importing Beam's harness takes a worker about a
second, and the runner starts its workers only when it runs the first stage,
after the driver has built the pipeline. So the driver starts its workers
*early*, as standbys (:func:`start_standby`), each waiting on a Unix socket
in a private temporary folder. The CLI, when it is the program (one job per
process), forks them right after importing Beam and the job's modules and
before any gRPC is started: the copies need no imports of their own. Code
that calls :func:`preprocessing.job.run` gets them as new processes
(``python -m preprocessing.worker --standby FOLDER N``) that import the
harness and the job's modules while the driver inspects the input and builds
the pipeline. The command the runner then starts for each worker is
``python -S .../worker.py --attach FOLDER`` (standard library only, a few
milliseconds): it claims a standby (an atomic rename of ``N.ready``), hands it
its environment (the control and logging addresses and pipeline options
that Beam's runner gives a worker, ``CONTROL_API_SERVICE_DESCRIPTOR`` and
friends) and waits for its exit status, so to the runner it is the worker
process. With no standby left (or none started) it ``exec``s the ordinary
worker. Standbys exit when their driver does, and the driver ends unused ones
(:func:`stop_standby`). A worker leaves with ``os._exit`` as soon as the
harness returns (its logs flushed): the interpreter's own teardown (joining
gRPC's threads) took ~0.3 s per worker, and the runner stops its workers one
after the other.

**Memory.** The driver (when the CLI is the program) and every worker tune
glibc's allocator before they start work (:func:`tune_memory`): the local
runner hands each worker its whole share of a stage's input as one bundle,
and the buffers that carry it otherwise stayed resident, freed, in each
thread's heap, so the process tree grew by ~1.9 KB per input image
(``bench/RESULTS-scale.md``; ~0.9 KB with the settings). A caller of
:func:`preprocessing.job.run` keeps its own process's allocator as it is;
its workers are tuned all the same.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class ConsoleFilter(logging.Filter):
    """This package's records at any level; others from WARNING up, minus Beam's 'apitools not found'."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "preprocessing" or record.name.startswith("preprocessing."):
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("apitools not found")


# Its level (set by the driver through --sdk_harness_log_level_overrides) says whether the harness's raw
# tracebacks of failed bundles reach the console: DEBUG when the driver shows Beam's own logs (--verbose).
TRACEBACKS_LOGGER = "preprocessing.worker.tracebacks"


class QuietTracebacks:
    """``sys.stderr`` minus the tracebacks Beam's harness prints for a failed bundle.

    The harness prints them straight to stderr (``sdk_worker._execute``) and
    also returns them to the driver, which raises the same error; the CLI
    turns that into one line. Everything else is passed through.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, False
        if text.startswith("Traceback (most recent call last):") and \
                not logging.getLogger(TRACEBACKS_LOGGER).isEnabledFor(logging.DEBUG):
            self._dropped = True
            return len(text)
        if dropped and text == "\n":  # print()'s line end after the dropped traceback
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def configure_console() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(ConsoleFilter())
    logging.getLogger().addHandler(handler)
    sys.stderr = QuietTracebacks(sys.stderr)


def _run_harness() -> int:
    """Beam's SDK harness in this process (its environment set); the exit status."""
    from apache_beam.runners.worker import sdk_worker_main

    try:
        sdk_worker_main.main(sys.argv)
        return 0
    except SystemExit as leaving:
        return leaving.code if isinstance(leaving.code, int) else 1
    except BaseException:  # noqa: BLE001 - printed as Python would (minus what QuietTracebacks drops)
        import traceback

        traceback.print_exc()
        return 1
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


# ---------------------------------------------------------------- memory (the local job's processes)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# (mmap threshold, trim threshold): blocks this large or larger get their own mapping, unmapped when freed; free
# memory at the top of the heap kept for reuse (glibc's own rule moves both up to 32 and 64 MiB). The driver
# decodes no images; a worker decodes them from the heap (PILLOW_BLOCK_SIZE under its threshold).
DRIVER_MALLOC = (1 << 20, 2 << 20)
WORKER_MALLOC = (2 << 20, 32 << 20)
PILLOW_BLOCK_SIZE = 1 << 20


def tune_memory(driver: bool = False) -> bool:
    """Keep this process's resident memory from growing with what crosses the local runner's shuffles.

    The local runner hands each worker its whole share of a stage's input as
    one bundle, so the buffers that carry it (the encoded partition, the
    gRPC message, protobuf's copy; in the driver and in the worker) and a
    worker's output before it is sent (up to 10 MB) grow with the input.
    glibc raises its mmap threshold to the largest block freed so far, after
    which such buffers come from the heap of the thread that allocated them
    (gRPC's, Beam's data channel's, the bundle's) and stay resident after
    the stage, freed but not returned: most of the ~1.9 KB per image the
    process tree grew by from 10,000 to 100,000 images
    (``bench/RESULTS-scale.md``). Here: one heap for all threads and a fixed
    mmap threshold (such buffers are unmapped when freed). A worker also
    keeps 32 MiB free at the top of its heap and has Pillow allocate images
    in 1 MiB blocks, so decoding reuses the heap as before: with a fixed
    threshold, Pillow's default 16 MiB blocks or a small trim threshold,
    each decoded 1-3 megapixel photo was mapped and faulted in anew (+40-50%
    CPU per photo). Only with glibc (``mallopt``); elsewhere nothing changes.
    Returns whether the allocator settings were applied.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc's parameter numbers; another libc may number them otherwise
    except (OSError, AttributeError):
        return False
    try:
        from PIL import Image

        Image.core.set_block_size(PILLOW_BLOCK_SIZE)
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - Pillow is a dependency
        pass
    mmap_threshold, trim_threshold = DRIVER_MALLOC if driver else WORKER_MALLOC
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)))


# ---------------------------------------------------------------- importing Beam

# Modules `import apache_beam` loads, each in a ``try: ... except ImportError`` of its own (2.77.0), for
# features these jobs never use: pandas for DataFrame batch type hints (apache_beam/typehints/__init__.py;
# pandas comes with cleanlab, for the trainer's label issues), and the BigQuery, Pub/Sub and cross-language
# IOs (apache_beam/io/__init__.py, which also pulls in requests; GCS paths do not need it: gs:// is
# registered by apache_beam/io/filesystems.py on its own). Together ~0.3 s of every job process's start-up
# and ~45 MB of its memory (bench/RESULTS-preprocessing.md).
UNUSED_BY_BEAM_JOBS = ("pandas", "apache_beam.io.gcp.bigquery")


def import_beam_lean() -> bool:
    """Import Beam without the optional modules it would load for features these jobs do not use.

    For the processes of this project's Beam jobs only (the program's driver
    and its local workers), never a library caller's, and only with the
    pinned Beam, which imports them as optional. The modules stay importable
    afterwards. Returns whether Beam was imported here.
    """
    if "apache_beam" in sys.modules or any(name in sys.modules for name in UNUSED_BY_BEAM_JOBS):
        return False
    if not pinned_beam():
        return False
    for name in UNUSED_BY_BEAM_JOBS:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" mark
    try:
        import apache_beam  # noqa: F401
    finally:
        for name in UNUSED_BY_BEAM_JOBS:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return True


# ---------------------------------------------------------------- standby workers (the driver's side)

BEAM_VERSION = "2.77.0"  # the pinned apache-beam (pyproject.toml): the standby hand-over is checked against it
LOCAL_RUNNER_NAMES = ("", "directrunner", "direct", "fnapirunner")  # --runner values that mean the local runner
_READY, _TAKEN, _SOCKET = ".ready", ".taken", ".sock"
FOLDER_PREFIX = "preprocessing-workers-"  # then <host>~<pid>- (preprocessing.owners): a killed driver's is removed
_standby = None


def pinned_beam() -> bool:
    """Whether the installed apache-beam is the one the hooks into its internals here were written for."""
    from importlib import metadata

    try:
        return metadata.version("apache-beam") == BEAM_VERSION
    except metadata.PackageNotFoundError:
        return False


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def make_package_importable() -> None:
    """Worker processes start with ``python -m ...``: let them import this package even when not installed."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
    if package_parent not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, *paths])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _flag(args: list[str], name: str) -> str | None:
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def local_workers(beam_args: list[str]) -> int:
    """How many worker processes the local runner will start for these Beam flags (0: another runner or mode).

    Read from the raw flags, before Beam is imported; the runner itself
    decides (:func:`preprocessing.runners.choose_runner`), so a wrong guess
    only costs an unused standby, or a worker started the ordinary way.
    """
    runner = (_flag(beam_args, "--runner") or "").strip().lower()
    if runner not in LOCAL_RUNNER_NAMES:
        return 0
    if (_flag(beam_args, "--direct_running_mode") or "multi_processing") != "multi_processing":
        return 0
    try:
        count = int(_flag(beam_args, "--direct_num_workers") or available_cores())
    except ValueError:
        return 0
    return count if count > 0 else (os.cpu_count() or 1)


class Standby:
    """``count`` worker processes, started now, each waiting until a runner's worker claims it.

    Forked from this process when it may be (``fork``: it has Beam and the
    job's modules imported and no other thread, and has started no gRPC yet,
    so the copies need no imports of their own), otherwise started as new
    Python processes that import Beam's harness while this one works.
    """

    def __init__(self, count: int, fork: bool = False) -> None:
        import subprocess
        import tempfile
        import threading

        from preprocessing import owners

        make_package_importable()
        remove_leftover_folders()
        self.folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{owners.owner()}-")
        self.processes: list = []
        self.forked: list[int] = []
        if fork and threading.active_count() == 1:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # or the copies would print what is buffered again
            for index in range(count):
                pid = os.fork()
                if pid == 0:
                    try:
                        standby(self.folder, str(index), forked=True)
                    finally:
                        os._exit(1)
                self.forked.append(pid)
            return
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "preprocessing.worker", "--standby", self.folder, str(index)],
                             stdin=subprocess.DEVNULL)
            for index in range(count)
        ]

    def command(self) -> str:
        """The shell command that runs one worker on a standby."""
        import shlex

        return " ".join([shlex.quote(sys.executable), "-S", shlex.quote(os.path.abspath(__file__)), "--attach",
                         shlex.quote(self.folder)])

    def close(self) -> None:
        """End the standbys nobody claimed (claimed ones have exited with their runner), remove the folder."""
        import shutil
        import signal
        import subprocess

        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.forked:
            try:
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGTERM)
                    os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def remove_leftover_folders() -> None:
    """Remove the standby folders (a few sockets and markers) of drivers on this host that were killed."""
    import shutil
    import tempfile

    from preprocessing import owners

    root, mine = tempfile.gettempdir(), owners.owner()
    try:
        entries = [entry for entry in os.scandir(root) if entry.name.startswith(FOLDER_PREFIX)]
    except OSError:
        return
    for entry in entries:
        if mine not in entry.name and owners.left_behind(entry.name, lambda: entry.stat().st_mtime):
            shutil.rmtree(entry.path, ignore_errors=True)


def start_standby(count: int, fork: bool = False) -> None:
    """Start ``count`` standby workers for this process's next local run (no-op if some are running).

    Only with the pinned Beam: the hand-over relies on how its runner starts a
    ``SubprocessSDKEnvironment`` worker (a shell command with the harness's
    environment variables). With another Beam the workers start the ordinary
    way, after the driver has built the pipeline.
    """
    global _standby
    if _standby is not None or count <= 0:
        return
    if fork:  # the program's own process, the one that holds what crosses the local runner's shuffles
        tune_memory(driver=True)
    if pinned_beam():
        _standby = Standby(count, fork)


def standby_command() -> str | None:
    """The worker command for the runner when standbys are running, else ``None``."""
    return _standby.command() if _standby is not None else None


def stop_standby() -> None:
    global _standby
    if _standby is not None:
        standby, _standby = _standby, None
        standby.close()


# ---------------------------------------------------------------- the worker processes' side

def _receive(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _preload() -> None:
    """What the job's steps import and build anyway on their first bundle, done while waiting."""
    from preprocessing import pipeline, shards, tfrecords  # noqa: F401 - Pillow, numpy, protobuf, Beam's IO

    tfrecords._example_class()


def standby(folder: str, name: str, forked: bool = False) -> None:
    """Wait, with Beam's harness imported, for a runner's worker to hand over its environment; then be it."""
    tune_memory()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(folder, name + _SOCKET))
    server.listen(1)
    with open(os.path.join(folder, name + _READY), "w"):  # claimable now; the claimant waits for the imports
        pass
    if forked:  # the driver's console handler goes; the worker's own comes below
        import random

        random.seed()
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
    configure_console()
    import_beam_lean()
    from apache_beam.runners.worker import sdk_worker_main  # noqa: F401 - the second it takes is why standbys exist

    _preload()
    parent = os.getppid()
    server.settimeout(0.5)
    while True:
        try:
            connection, _ = server.accept()
            break
        except socket.timeout:
            if os.getppid() != parent:  # the driver is gone
                os._exit(0)
    server.close()
    connection.settimeout(None)
    environment = json.loads(_receive(connection))
    os.environ.clear()
    os.environ.update(environment)
    code = _run_harness()
    try:
        connection.sendall(str(code).encode())
        connection.close()
    finally:
        os._exit(code)


def attach(folder: str) -> None:
    """Run as a worker by claiming a standby: hand it this process's environment, exit with its status."""
    environment = json.dumps(dict(os.environ)).encode()
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(_READY):
            continue
        name = entry[: -len(_READY)]
        try:
            os.rename(os.path.join(folder, entry), os.path.join(folder, name + _TAKEN))
        except OSError:
            continue  # another worker claimed it first
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(os.path.join(folder, name + _SOCKET))
            connection.sendall(environment)
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            connection.close()
            continue  # that standby is gone
        status = _receive(connection).strip()
        sys.exit(int(status) if status.isdigit() else 1)
    os.execv(sys.executable, [sys.executable, "-m", "preprocessing.worker"])


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--attach"]:
        attach(args[1])
    elif args[:1] == ["--standby"]:
        standby(args[1], args[2])
    else:
        tune_memory()
        configure_console()
        import_beam_lean()
        os._exit(_run_harness())


if __name__ == "__main__":
    main()
