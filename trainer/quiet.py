"""Importing TensorFlow without its C++ start-up chatter, unless that chatter explains a missing GPU.

TensorFlow's C++ side writes oneDNN and CUDA-probing lines to file
descriptor 2 before ``TF_CPP_MIN_LOG_LEVEL`` takes effect; they would bury a
one-line error. On a machine that should have a GPU (an NVIDIA device node,
or the ``gpu`` extra's CUDA libraries installed) and where TensorFlow finds
none, those same lines are the reason, so they are shown then, with a warning.
The trainer CLI and the demo share these helpers.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import re
import sys
import tempfile

log = logging.getLogger("trainer")


def import_tensorflow_quietly(verbose: bool) -> None:
    """Import TensorFlow with its C++ start-up chatter hidden unless ``--verbose`` or a GPU went missing."""
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        with stderr_redirected(captured.fileno()):
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
        expected = gpu_expected()
        if expected and not gpus:
            captured.seek(0)
            lines = []
            for line in captured.read().decode("utf-8", "replace").splitlines():
                line = re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ", "", line.strip())  # absl's time and thread
                if line not in lines and any(w in line.lower() for w in ("cuda", "cudnn", "gpu", "could not", "failed")):
                    lines.append(line)
            log.warning("a GPU was expected (%s) but TensorFlow found none; training runs on the CPU. "
                        "TensorFlow said: %s", expected, " | ".join(lines[-4:]) or "nothing (run with --verbose)")


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
