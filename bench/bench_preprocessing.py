"""Benchmark: the Beam preprocessing job against a plain multiprocessing Pillow loop.

Both do the same per-image work with the same function
(:func:`preprocessing.images.convert`: decode, EXIF, RGB, resize, re-encode)
over the same files, and both write what they produce; the Beam job also
hashes, deduplicates, counts and shards. Each runs as a child process whose
whole process tree's resident memory is sampled from /proc, so the peak
includes Beam's worker processes and the Pool's workers; the largest single
process's peak is kept too, and the driver's own peak (the Beam job's
launching process, the Pool's parent) is its ``getrusage`` maximum, exact.
With two or more generated sizes at least 10x apart it also reports the
memory growth per extra image between the smallest and the largest.

Run by hand (not a test)::

    .venv/bin/python bench/bench_preprocessing.py                 # clothing-small + 1,000, 5,000 and 10,000 generated
    .venv/bin/python bench/bench_preprocessing.py --sizes 1000 --skip-clothing   # quick look
    .venv/bin/python bench/bench_preprocessing.py --baseline /tmp/old-checkout     # also another version's job

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
import resource
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


def image_set(folder: Path, count: int, make, *extra, digits: int = 6, chunksize: int = 64) -> Path:
    """``count`` generated JPEGs in 4 class folders under ``folder``, drawn by ``make((path, cls, index,
    *extra))`` in a Pool; cached between runs (a ``.complete`` marker)."""
    from preprocessing.sample_data import CLASSES

    done = folder / ".complete"
    if done.exists():
        return folder
    jobs = []
    for index in range(count):
        cls = CLASSES[index % len(CLASSES)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / cls / f"{index:0{digits}d}.jpg"), cls, index, *extra))
    with multiprocessing.Pool() as pool:
        pool.map(make, jobs, chunksize=chunksize)
    done.write_text("")
    return folder


def generated_set(root: Path, count: int) -> Path:
    """``count`` photo-sized generated JPEGs in 4 class folders (cached between runs)."""
    return image_set(root / f"generated-{count}", count, _make_one)


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
    _write_self_rss()


# ---------------------------------------------------------------- measuring

def _tree_rss(root_pid: int) -> tuple[int, int]:
    """Resident bytes of ``root_pid`` and all its descendants, and of the largest one of them (from /proc)."""
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
    total, largest, stack = 0, 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        largest = max(largest, rss.get(pid, 0))
        stack.extend(children.get(pid, []))
    return total, largest


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_SELF_RSS = "BENCH_SELF_RSS_FILE"  # where a measured command writes its own peak RSS (KB) as it exits


def _write_self_rss() -> None:
    path = os.environ.get(_SELF_RSS)
    if path:
        Path(path).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


# The Beam job as `python -m preprocessing ARGS` would run it, plus its own peak RSS at exit.
_JOB_LAUNCHER = ("import atexit, os, resource, runpy, sys\n"
                 "atexit.register(lambda: open(os.environ['" + _SELF_RSS + "'], 'w').write("
                 "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
                 "sys.argv = ['preprocessing', *sys.argv[1:]]\n"
                 "runpy.run_module('preprocessing', run_name='__main__', alter_sys=True)\n")


def measure(command: list[str], cwd: Path = REPO) -> dict:
    """Run ``command``; wall seconds, CPU seconds and peak RSS: process tree, largest process, the command's own.

    Tree and largest process are sampled every 0.1 s. CPU time counts the
    processes of the tree that were waited for (Beam's workers and the
    Pool's are). The command's own peak is what it writes to
    ``$BENCH_SELF_RSS_FILE`` as it exits.
    """
    cpu_before = _children_cpu()
    rss_file = Path(f"/tmp/bench-preprocessing-self-rss-{os.getpid()}")
    rss_file.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, _SELF_RSS: str(rss_file)})
    peak = largest = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, largest
        while not stop.is_set():
            tree, one = _tree_rss(proc.pid)
            peak, largest = max(peak, tree), max(largest, one)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{stderr[-3000:]}")
    own = int(rss_file.read_text()) * 1024 if rss_file.exists() else 0
    rss_file.unlink(missing_ok=True)
    return {"seconds": seconds, "cpu_seconds": _children_cpu() - cpu_before, "peak_rss_mb": peak / 2**20,
            "largest_rss_mb": max(largest, own) / 2**20, "driver_rss_mb": own / 2**20}


def _summary(prefix: str, runs: list[dict], count: int) -> dict:
    seconds = sorted(m["seconds"] for m in runs)
    return {
        f"{prefix}_seconds": seconds[0], f"{prefix}_median": seconds[len(seconds) // 2],
        f"{prefix}_images_per_s": count / seconds[0], f"{prefix}_peak_mb": max(m["peak_rss_mb"] for m in runs),
        f"{prefix}_largest_mb": max(m["largest_rss_mb"] for m in runs),
        f"{prefix}_driver_mb": max(m["driver_rss_mb"] for m in runs),
        f"{prefix}_cpu": sorted(m["cpu_seconds"] for m in runs)[len(runs) // 2],
    }


def bench_one(name: str, input_dir: Path, work: Path, size: int, workers: int, repeat: int,
              baseline: Path | None = None) -> dict:
    """Beam and plain, interleaved ``repeat`` times; the best time of each (the least disturbed by other load)."""
    count = len(list_images(input_dir))
    out = work / f"beam-{name}"

    def job(output: Path) -> list[str]:
        return [sys.executable, "-c", _JOB_LAUNCHER, "--input", str(input_dir), "--output", str(output),
                "--image-size", str(size), "--overwrite", "--progress-seconds", "0", f"--direct_num_workers={workers}"]

    beam_command = job(out)
    plain_command = [sys.executable, __file__, "--plain", str(input_dir), str(work / f"plain-{name}.bin"),
                     "--image-size", str(size), "--workers", str(workers)]
    # the same job from another checkout (its own preprocessing package: cwd and the workers' PYTHONPATH)
    base_command = job(work / f"baseline-{name}")
    beams, plains, bases = [], [], []
    for _ in range(repeat):
        beams.append(measure(beam_command))
        plains.append(measure(plain_command))
        if baseline:
            bases.append(measure(base_command, cwd=baseline))
    stats = json.loads((out / "stats.json").read_text())
    row = {"dataset": name, "images": count, "written": stats["totals"]["written"],
           **_summary("beam", beams, count), **_summary("plain", plains, count)}
    row["ratio"] = row["beam_images_per_s"] / row["plain_images_per_s"]
    row["ratio_median"] = row["plain_median"] / row["beam_median"]
    if bases:
        row.update(_summary("base", bases, count))
        row["base_ratio"] = row["base_images_per_s"] / row["plain_images_per_s"]
        row["base_ratio_median"] = row["plain_median"] / row["base_median"]
    print(f"  {name}: beam {row['beam_images_per_s']:.1f} img/s ({row['beam_peak_mb']:.0f} MB), "
          f"plain {row['plain_images_per_s']:.1f} img/s ({row['plain_peak_mb']:.0f} MB), ratio {row['ratio']:.2f}"
          + (f"; baseline beam {row['base_images_per_s']:.1f} img/s ({row['base_peak_mb']:.0f} MB)" if bases else ""),
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


def _git_head(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


def table(rows: list[dict], baseline: str | None = None) -> str:
    """One line per dataset and job: this checkout's Beam job, the baseline's (if any), the plain loop."""
    lines = [
        "| dataset | images | run | best s (median) | img/s | peak MB (tree) | largest process MB | driver MB "
        "| CPU s (median) | ratio to plain, best (median) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    jobs = [("beam", "Beam"), *([("base", f"Beam, {baseline}")] if baseline else []), ("plain", "plain Pool")]
    for r in rows:
        for prefix, label in jobs:
            if f"{prefix}_seconds" not in r:
                continue
            ratio = "" if prefix == "plain" else (
                f"{r['ratio' if prefix == 'beam' else 'base_ratio']:.2f} "
                f"({r['ratio_median' if prefix == 'beam' else 'base_ratio_median']:.2f})")
            lines.append(
                f"| {r['dataset']} | {r['images']:,} | {label} | {r[prefix + '_seconds']:.1f} ({r[prefix + '_median']:.1f}) "
                f"| {r[prefix + '_images_per_s']:.1f} | {r[prefix + '_peak_mb']:.0f} | {r[prefix + '_largest_mb']:.0f} "
                f"| {r[prefix + '_driver_mb']:.0f} | {r[prefix + '_cpu']:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def growth(rows: list[dict], baseline: str | None = None) -> str:
    """KB of peak RSS per extra image between the smallest and the largest generated set (sizes >= 10x apart)."""
    generated = sorted((r for r in rows if r["dataset"].startswith("generated-")), key=lambda r: r["images"])
    if len(generated) < 2 or generated[-1]["images"] < 10 * generated[0]["images"]:
        return ""
    small, large = generated[0], generated[-1]
    extra = large["images"] - small["images"]
    lines = [
        f"Peak memory per extra image, {small['images']:,} -> {large['images']:,} images "
        f"(KB per image; the peaks of all runs of each size):",
        "",
        "| run | tree | largest process | driver |",
        "|---|---:|---:|---:|",
    ]
    jobs = [("beam", "Beam"), *([("base", f"Beam, {baseline}")] if baseline else []), ("plain", "plain Pool")]
    for prefix, label in jobs:
        if f"{prefix}_seconds" not in small:
            continue
        per = [(large[f"{prefix}_{kind}_mb"] - small[f"{prefix}_{kind}_mb"]) * 1024 / extra
               for kind in ("peak", "largest", "driver")]
        lines.append(f"| {label} | {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO / "bench" / "out"), help="folder for generated inputs and outputs")
    parser.add_argument("--sizes", default="1000,5000,10000", help="generated set sizes (default %(default)s)")
    parser.add_argument("--skip-clothing", action="store_true", help="leave out the real clothing-small photos")
    parser.add_argument("--image-size", type=int, default=224, help="output side in pixels (default %(default)s)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for both (default: cores)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; the best counts (default %(default)s)")
    parser.add_argument("--results", help="also write the Markdown table and context to this file")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run the Beam job of another checkout of this repository (e.g. a git worktree of "
                             "an older commit), interleaved with the others, for a before/after under the same load")
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
    baseline = Path(args.baseline).resolve() if args.baseline else None
    rows = [bench_one(name, folder, work, args.image_size, args.workers, args.repeat, baseline)
            for name, folder in datasets]
    load_after = os.getloadavg()
    report = "\n".join([
        f"Machine: {machine()}",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}",
        f"Output {args.image_size}x{args.image_size} JPEG q95, stretch; {args.workers} worker processes each; "
        f"{args.repeat} interleaved runs of each, best (and median) wall time of the whole command.",
        *([f"Baseline: the Beam job of {baseline} ({_git_head(baseline)})."] if baseline else []),
        "",
        table(rows, f"baseline {baseline}" if baseline else None),
        "",
        growth(rows, f"baseline {baseline}" if baseline else None),
    ])
    print(report)
    if args.results:
        Path(args.results).write_text(report + "\n")


if __name__ == "__main__":
    main()
