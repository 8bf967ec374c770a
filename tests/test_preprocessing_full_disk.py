"""A full disk (simulated by a file size limit, RLIMIT_FSIZE) while the job writes: one line, nothing published.

The real CLI runs in a subprocess whose file size limit is set before it
starts (inherited by the Beam worker processes) and which ignores SIGXFSZ, so
a write past the limit fails with EFBIG as a write to a full disk fails with
ENOSPC. A re-run once the limit is lifted succeeds.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

from preprocessing.sample_data import SampleSpec, generate


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_fails_in_one_line_publishes_nothing_and_a_rerun_works(tmp_path, repo_root):
    photos = tmp_path / "photos"
    generate(str(photos), SampleSpec(per_class=30))
    out = tmp_path / "data"
    # one shard per split, so that the train shard (~100 images) outgrows the limit (default shards stay below it)
    command = [sys.executable, "-m", "preprocessing", "--input", str(photos), "--output", str(out),
               "--image-size", "64", "--progress-seconds", "0", "--num-shards", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    failed = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_file_size(60_000))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("tlp-preprocess: error:")]
    assert len(errors) == 1 and "file size limit reached" in errors[0] and str(out) in errors[0]
    assert not [line for line in failed.stderr.splitlines() if line.strip() and " INFO " not in line
                and not line.startswith("tlp-preprocess: error:")], failed.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"], "a partial output or staging folder is left"

    again = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "stats.json").exists() and (out / "labels.txt").exists()
