"""What every stage's command line shares: its name, its one-line errors, ``--verbose``, and a quiet TensorFlow.

**One name per program**, in its usage line, its ``--version`` and every error
line: the console script the project installs (``PROGRAMS``), and for the two
programs without one their ``python -m`` command. ``--help`` names the
``python -m`` equivalent of a console script (``also_runs_as``).

**One error format**: a mistake is one line on stderr, ``PROG: error: WHAT``,
with exit status 2 (1 when a server refused or could not be reached, or a job
failed); never a traceback unless ``--verbose``. :class:`Parser` makes
argparse's own errors (an unknown flag, a bad value) that same line instead of
its usage block.

**``--verbose`` / ``-v``** in every program: debug logs, TensorFlow's start-up
lines, and full tracebacks.

**A quiet TensorFlow.** TensorFlow's C++ side writes oneDNN, CUDA-probing and
absl lines to file descriptor 2 as it loads (``TF_CPP_MIN_LOG_LEVEL`` does not
reach them); they would bury a one-line error. :func:`import_tensorflow_quietly`
hides them, unless a GPU was expected and TensorFlow found none: then those
lines are the reason, and a warning quotes them. Every stage that loads
TensorFlow (the trainer, the serving programs, the demo) imports it through
here, which is why this lives in the package every stage already imports (the
serving package never imports the trainer's internals).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import logging
import os
import re
import sys
import tempfile

# module run by `python -m` -> the program's name in usage, --version and error lines
PROGRAMS = {
    "preprocessing": "tlp-preprocess",
    "preprocessing.sample_data": "python -m preprocessing.sample_data",
    "trainer": "tlp-train",
    "serving.server": "tlp-serve",
    "serving.client": "tlp-client",
    "serving.loadtest": "tlp-loadtest",
    "serving.release": "tlp-release",
    "serving.batch": "tlp-predict",
    "scripts.demo": "python -m scripts.demo",
}

EXIT_USER_ERROR = 2
EXIT_FAILED = 1


def also_runs_as(module: str) -> str:
    """``(also: python -m MODULE)`` for a program with a console script, for its ``--help``; else ``""``."""
    return "" if PROGRAMS[module].startswith("python -m") else f" (also: python -m {module})"


def error_line(program: str, message: object) -> str:
    """``PROG: error: MESSAGE`` on one line, whatever lines ``message`` had; an OSError as ``FILE: reason``."""
    if isinstance(message, OSError) and message.filename and message.strerror:
        message = f"{message.filename}: {message.strerror}"
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return f"{program}: error: {text or type(message).__name__}"


def fail(program: str, message: object, code: int = EXIT_USER_ERROR) -> int:
    """Print :func:`error_line` to stderr; return ``code`` (the exit status)."""
    print(error_line(program, message), file=sys.stderr, flush=True)
    return code


def at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum`` (``'0' must be at least 1``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse whose errors are the program's one error line (exit status 2), in subcommands too.

    ``program`` (default: ``prog``) is the name errors start with; a
    subcommand's parser inherits it and names itself after it:
    ``tlp-client: error: predict: the following arguments are required: ...``.
    """

    def __init__(self, *args, program: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.program = program or self.prog

    def error(self, message: str):  # argparse's hook for every parse error
        command = self.prog.removeprefix(self.program).strip()
        raise SystemExit(fail(self.program, f"{command}: {message}" if command else message))

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", functools.partial(type(self), program=self.program))
        return super().add_subparsers(**kwargs)


def add_verbose_flag(parser: argparse.ArgumentParser, more: str = "") -> None:
    """``--verbose`` / ``-v``: the same flag in every program; ``more`` says what else it shows there."""
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="debug logging and full tracebacks on failure" + (f"; {more}" if more else ""))


class StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is at each record (tests and :func:`cpp_stderr_silenced`
    replace it), not the stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def import_tensorflow_quietly(verbose: bool, runs_on: str | None = None, logger: logging.Logger | None = None) -> None:
    """Import TensorFlow with its C++ start-up lines hidden, unless ``verbose``.

    ``runs_on`` (``"training"``, ``"serving"``) names what will compute with
    it: TensorFlow then also looks for GPUs inside the quiet block (the CUDA
    probe is where most lines come from), and when a GPU was expected but none
    was found, ``logger`` warns with TensorFlow's own reason. Without it (a
    client that only needs TensorFlow's protos) no device is probed.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        with stderr_redirected(captured.fileno()):
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU") if runs_on else None
        expected = gpu_expected() if runs_on else ""
        if expected and not gpus:
            captured.seek(0)
            lines = []
            for line in captured.read().decode("utf-8", "replace").splitlines():
                line = re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line.strip())  # absl's time and thread
                if line not in lines and any(w in line.lower() for w in ("cuda", "cudnn", "gpu", "could not", "failed")):
                    lines.append(line)
            (logger or logging.getLogger(__name__)).warning(
                "a GPU was expected (%s) but TensorFlow found none; %s runs on the CPU. TensorFlow said: %s",
                expected, runs_on, " | ".join(lines[-4:]) or "nothing (run with --verbose)")


def gpu_expected() -> str:
    """Why this machine should have a GPU for TensorFlow ("" when nothing says so)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return "an NVIDIA device is present"
    try:
        if importlib.util.find_spec("nvidia.cudnn") is not None:
            return "the CUDA libraries of the gpu extra are installed"
    except (ImportError, ValueError):
        pass
    return ""


@contextlib.contextmanager
def stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block: C++ log lines bypass Python's ``sys.stderr``."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with stderr_redirected(devnull):
            yield
    finally:
        os.close(devnull)


@contextlib.contextmanager
def cpp_stderr_silenced():
    """File descriptor 2 to /dev/null for the block, while Python's ``sys.stderr`` still reaches the console.

    For work that logs in Python while TensorFlow's C++ side prints once-only
    lines (a server's first model load: CUDA's ``cuInit``, oneDNN's
    ``DT_UINT8`` notice). Python output must go through ``sys.stderr`` as it is
    at the time of writing (``print(file=sys.stderr)``, :class:`StderrHandler`).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                        errors="backslashreplace")
    previous = sys.stderr
    sys.stderr = console
    try:
        with stderr_silenced():
            yield
    finally:
        sys.stderr = previous
        console.close()
        os.close(saved)


@contextlib.contextmanager
def stderr_redirected(target_fd: int):
    """File descriptor 2 points at ``target_fd`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(target_fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
