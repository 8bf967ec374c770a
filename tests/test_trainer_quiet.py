"""TensorFlow's C++ start-up lines are hidden, except when they explain why an expected GPU is missing.

(:mod:`preprocessing.console`, which the trainer, the serving programs and the demo share.)
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import preprocessing.console as quiet
quiet.gpu_expected = lambda: {expected!r}
quiet.import_tensorflow_quietly(verbose=False, runs_on="training")
"""


def _run(repo_root, expected: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(expected=expected)], cwd=repo_root,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_on_a_cpu_machine_the_import_prints_nothing(repo_root):
    assert _run(repo_root, "") == ""


def test_a_missing_gpu_that_was_expected_is_a_warning_with_tensorflows_reason(repo_root):
    err = _run(repo_root, "an NVIDIA device is present")
    assert err.startswith("WARNING a GPU was expected (an NVIDIA device is present) but TensorFlow found none")
    assert "cuda" in err.lower()  # this machine's TensorFlow says why CUDA did not load
