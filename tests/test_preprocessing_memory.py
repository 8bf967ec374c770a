"""The job's memory grows by a bounded amount per input file: the driver's, and the whole process tree's.

With the local runner the driver is the process that keeps whatever crosses
a shuffle between the job's steps, so per-file data kept there grows with
the input (it used to be ~3 KB per file). The job hands entries on packed,
a few tens of bytes each. Each stage's input reaches a worker as one bundle,
so the buffers that carry it (in the driver and in the workers) grow with
the input too, and glibc used to keep them resident once freed, in each
thread's heap: that is what :func:`preprocessing.worker.tune_memory` stops
(``bench/RESULTS-scale.md``).

This test runs the real command, as the program (forked workers, two of
them), on two sets of tiny images 10x apart and bounds, per extra file, the
growth of the driver's peak RSS (``getrusage`` of that process alone) and of
the process tree's: the driver's plus each of its descendants' own peak
(``VmHWM``, the kernel's high-water mark, read from /proc while they run).
No time is measured. The bounds sit between what the job measured on the
development VM with and without those settings (5,000 -> 50,000 files):
driver 0.37-0.44 KB per file (0.84-0.90 without), tree 1.39-1.51 KB
(2.22-2.33 without). The tree here is the sum of each process's own peak,
whenever it came, so it counts more than the bench's simultaneous peak
(~0.9 KB per image from 10,000 to 100,000): the listing worker's peak while
it holds the whole match result (~0.3 KB a file), and each worker's bounded
batch of hashed entries, which at these sizes is not yet full.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from PIL import Image

SMALL, LARGE = 5_000, 50_000
DRIVER_BOUND_BYTES_PER_FILE = 640
TREE_BOUND_BYTES_PER_FILE = 1850

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


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _peak_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _run(photos, out, repo_root) -> tuple[int, dict[int, int]]:
    """The driver's peak RSS (KB) and each descendant's (pid -> KB, its last reading: VmHWM only grows)."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(photos), str(out)], cwd=repo_root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    readings: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in _descendants(proc.pid):
                value = _peak_kb(pid)
                if value:
                    peaks[pid] = value
                    readings[pid] = readings.get(pid, 0) + 1
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        done.set()
        sampler.join()
    assert proc.returncode == 0, stderr[-3000:]
    # a process seen once or twice is a fork caught before its exec, with the driver's pages: not a worker
    workers = {pid: kb for pid, kb in peaks.items() if readings[pid] >= 3}
    return int(stdout.split("driver_maxrss_kb")[1].split()[0]), workers


def test_memory_per_input_file_is_bounded_in_the_driver_and_the_process_tree(tmp_path, repo_root):
    driver, tree, processes = {}, {}, {}
    for count in (SMALL, LARGE):
        photos = tmp_path / f"photos-{count}"
        _tiny_images(photos, count)
        out = tmp_path / f"data-{count}"
        driver[count], workers = _run(photos, out, repo_root)
        tree[count] = driver[count] + sum(workers.values())
        processes[count] = sorted(workers.values(), reverse=True)
        stats = json.loads((out / "stats.json").read_text())
        assert stats["totals"] == {"found": count, "written": count, "rejected": 0, "duplicates": 0}
    per_file = {name: (peaks[LARGE] - peaks[SMALL]) * 1024 / (LARGE - SMALL)
                for name, peaks in (("driver", driver), ("tree", tree))}
    seen = (f"driver {driver[SMALL]:,} KB at {SMALL:,} files, {driver[LARGE]:,} KB at {LARGE:,}; its descendants' "
            f"peaks {processes[SMALL]} KB and {processes[LARGE]} KB")
    assert len(processes[LARGE]) >= 2, f"no worker processes seen: {seen}"
    assert per_file["driver"] < DRIVER_BOUND_BYTES_PER_FILE, (
        f"the driver's peak RSS grew by {per_file['driver']:.0f} bytes per extra input file ({seen})")
    assert per_file["tree"] < TREE_BOUND_BYTES_PER_FILE, (
        f"the process tree's peak RSS grew by {per_file['tree']:.0f} bytes per extra input file ({seen})")
