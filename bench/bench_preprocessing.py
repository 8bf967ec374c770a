"""Benchmark: the Beam preprocessing job against a plain multiprocessing Pillow loop.

Both do the same per-image work with the same function
(:func:`preprocessing.images.convert`: decode, EXIF, RGB, resize, re-encode)
over the same files, and both write what they produce; the Beam job also
hashes, deduplicates, counts and shards. Each runs as a child process whose
whole process tree's resident memory is sampled from /proc, so the peak
includes Beam's worker processes and the Pool's workers.

Run by hand (not a test)::

    .venv/bin/python bench/bench_preprocessing.py                 # clothing-small + 1,000 and 10,000 generated
    .venv/bin/python bench/bench_preprocessing.py --sizes 1000 --skip-clothing   # quick look

Writes a Markdown table to stdout and, with --results, to that file.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- inputs

def _make_one(args) -> None:
    path, cls, seed = args
    from preprocessing.sample_data import draw_image

    rng = random.Random(seed)
    image = draw_image(cls, rng, rng.randint(300, 640), rng.randint(300, 640))
    image.save(path, format="JPEG", quality=90)


def generated_set(root: Path, count: int) -> Path:
    """``count`` photo-sized generated JPEGs in 4 class folders (cached between runs)."""
    from preprocessing.sample_data import CLASSES

    folder = root / f"generated-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    jobs = []
    for index in range(count):
        cls = CLASSES[index % len(CLASSES)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / cls / f"{index:06d}.jpg"), cls, index))
    with multiprocessing.Pool() as pool:
        pool.map(_make_one, jobs, chunksize=64)
    done.write_text("")
    return folder


def list_images(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and p.parent != root)


# ---------------------------------------------------------------- the plain loop (child process)

_SIZE = (224, 224)


def _convert(path: str) -> bytes:
    from preprocessing import images

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return images.convert(data, _SIZE, "stretch", "jpeg", 95).encoded
    except images.Rejected:
        return b""


def plain_loop(input_dir: str, output: str, size: int, workers: int) -> None:
    """Decode-resize-encode every image with a Pool; write the results to one length-prefixed file."""
    global _SIZE
    _SIZE = (size, size)
    paths = list_images(Path(input_dir))
    with multiprocessing.Pool(workers) as pool, open(output, "wb") as out:
        for encoded in pool.imap_unordered(_convert, paths, chunksize=16):
            out.write(struct.pack("<I", len(encoded)))
            out.write(encoded)


# ---------------------------------------------------------------- measuring

def _tree_rss(root_pid: int) -> int:
    """Resident bytes of ``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def measure(command: list[str]) -> dict:
    """Run ``command``; wall seconds and the peak RSS of its process tree, sampled every 0.1 s."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20}


def bench_one(name: str, input_dir: Path, work: Path, size: int, workers: int, repeat: int) -> dict:
    """Beam and plain, interleaved ``repeat`` times; the best time of each (the least disturbed by other load)."""
    count = len(list_images(input_dir))
    out = work / f"beam-{name}"
    beam_command = [sys.executable, "-m", "preprocessing", "--input", str(input_dir), "--output", str(out),
                    "--image-size", str(size), "--overwrite", "--progress-seconds", "0",
                    f"--direct_num_workers={workers}"]
    plain_command = [sys.executable, __file__, "--plain", str(input_dir), str(work / f"plain-{name}.bin"),
                     "--image-size", str(size), "--workers", str(workers)]
    beams, plains = [], []
    for _ in range(repeat):
        beams.append(measure(beam_command))
        plains.append(measure(plain_command))
    stats = json.loads((out / "stats.json").read_text())
    beam_s = sorted(m["seconds"] for m in beams)
    plain_s = sorted(m["seconds"] for m in plains)
    row = {
        "dataset": name, "images": count, "written": stats["totals"]["written"],
        "beam_seconds": beam_s[0], "beam_median": beam_s[len(beam_s) // 2],
        "beam_images_per_s": count / beam_s[0], "beam_peak_mb": max(m["peak_rss_mb"] for m in beams),
        "plain_seconds": plain_s[0], "plain_median": plain_s[len(plain_s) // 2],
        "plain_images_per_s": count / plain_s[0], "plain_peak_mb": max(m["peak_rss_mb"] for m in plains),
    }
    row["ratio"] = row["beam_images_per_s"] / row["plain_images_per_s"]
    row["ratio_median"] = row["plain_median"] / row["beam_median"]
    print(f"  {name}: beam {row['beam_images_per_s']:.1f} img/s ({row['beam_peak_mb']:.0f} MB), "
          f"plain {row['plain_images_per_s']:.1f} img/s ({row['plain_peak_mb']:.0f} MB), ratio {row['ratio']:.2f}",
          file=sys.stderr)
    return row


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {len(os.sched_getaffinity(0))} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | images | Beam best s (median) | Beam img/s | Beam peak MB | plain best s (median) | plain img/s "
        "| plain peak MB | ratio best (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['images']:,} | {r['beam_seconds']:.1f} ({r['beam_median']:.1f}) | "
            f"{r['beam_images_per_s']:.1f} | {r['beam_peak_mb']:.0f} | {r['plain_seconds']:.1f} ({r['plain_median']:.1f}) | "
            f"{r['plain_images_per_s']:.1f} | {r['plain_peak_mb']:.0f} | {r['ratio']:.2f} ({r['ratio_median']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "bench" / "out"), help="folder for generated inputs and outputs")
    parser.add_argument("--sizes", default="1000,10000", help="generated set sizes (default %(default)s)")
    parser.add_argument("--skip-clothing", action="store_true", help="leave out the real clothing-small photos")
    parser.add_argument("--image-size", type=int, default=224, help="output side in pixels (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for both (default: cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the best counts (default %(default)s)")
    parser.add_argument("--results", help="also write the Markdown table and context to this file")
    parser.add_argument("--plain", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        plain_loop(args.plain[0], args.plain[1], args.image_size, args.workers)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    datasets = []
    if not args.skip_clothing and CLOTHING.is_dir():
        datasets.append(("clothing-small", CLOTHING))
    for count in (int(c) for c in args.sizes.split(",") if c):
        print(f"generating {count:,} images (cached in {work}) ...", file=sys.stderr)
        datasets.append((f"generated-{count}", generated_set(work, count)))
    load_before = os.getloadavg()
    rows = [bench_one(name, folder, work, args.image_size, args.workers, args.repeat) for name, folder in datasets]
    load_after = os.getloadavg()
    report = "\n".join([
        f"Machine: {machine()}",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}",
        f"Output {args.image_size}x{args.image_size} JPEG q95, stretch; {args.workers} worker processes each; "
        f"{args.repeat} interleaved runs of each, best (and median) wall time of the whole command.",
        "",
        table(rows),
    ])
    print(report)
    if args.results:
        Path(args.results).write_text(report + "\n")


if __name__ == "__main__":
    main()
