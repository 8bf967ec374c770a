"""Importing TensorFlow without its C++ start-up chatter.

TensorFlow's C++ side writes oneDNN and CUDA-probing lines to file
descriptor 2 before ``TF_CPP_MIN_LOG_LEVEL`` takes effect; they would bury a
one-line error. The trainer CLI and the demo share these two helpers.
"""

from __future__ import annotations

import contextlib
import os
import sys


def import_tensorflow_quietly(verbose: bool) -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) hidden unless ``--verbose``.

    Those lines are written before ``TF_CPP_MIN_LOG_LEVEL`` takes effect and
    would bury a one-line error; ``--verbose`` shows them (useful on a GPU
    machine whose CUDA libraries do not load).
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    with stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")


@contextlib.contextmanager
def stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block: C++ log lines bypass Python's ``sys.stderr``."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
