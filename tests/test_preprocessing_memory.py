"""The driver's own memory grows by a bounded amount per input file.

With the local runner the driver is the process that keeps whatever crosses
a shuffle between the job's steps, so per-file data kept there grows with
the input (it used to be ~3 KB per file). The job hands entries on packed,
a few tens of bytes each; this test runs the real command, as the program
(forked workers, two of them), on two sets of tiny images 10x apart and
bounds the growth of the driver's peak RSS (``getrusage`` of that process
alone) per extra file. No time is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

SMALL, LARGE = 400, 4000
BOUND_BYTES_PER_FILE = 2048

# The command as the program would run it (it leaves with os._exit once its atexit handlers have run).
DRIVER = """
import atexit, resource, sys
atexit.register(lambda: print("driver_maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True))
from preprocessing.cli import main
sys.argv = ["preprocessing", "--input", sys.argv[1], "--output", sys.argv[2], "--image-size", "8",
            "--progress-seconds", "0", "--direct_num_workers=2"]
sys.exit(main())
"""


def _tiny_images(root, count: int) -> None:
    for index in range(count):
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = (index % 256, (index // 256) % 256, 7)
        Image.new("RGB", (8, 8), colour).save(folder / f"{index:06d}.png")


def _driver_peak_kb(photos, out, repo_root) -> int:
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(photos), str(out)], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("driver_maxrss_kb")[1].split()[0])


def test_driver_memory_per_input_file_is_bounded(tmp_path, repo_root):
    peaks = {}
    for count in (SMALL, LARGE):
        photos = tmp_path / f"photos-{count}"
        _tiny_images(photos, count)
        out = tmp_path / f"data-{count}"
        peaks[count] = _driver_peak_kb(photos, out, repo_root)
        stats = json.loads((out / "stats.json").read_text())
        assert stats["totals"] == {"found": count, "written": count, "rejected": 0, "duplicates": 0}
    per_file = (peaks[LARGE] - peaks[SMALL]) * 1024 / (LARGE - SMALL)
    assert per_file < BOUND_BYTES_PER_FILE, (
        f"the driver's peak RSS grew by {per_file:.0f} bytes per extra input file "
        f"({peaks[SMALL]:,} KB at {SMALL:,} files, {peaks[LARGE]:,} KB at {LARGE:,})")
