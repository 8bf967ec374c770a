"""Benchmark (issue 16): how preprocessing and a minimal trainer run scale with the number of images.

Generates small images (32x32 JPEGs in 4 class folders, made with a
multiprocessing pool and cached between runs) at two or more sizes at least
10x apart, then for each size runs

* the preprocessing job: ``python -m preprocessing --input IMAGES --output DATA --image-size 32 --overwrite``;
* a minimal trainer run on its output: random weights, MobileNetV2 at 32 px,
  one random-search trial of one epoch, head only, one final epoch, test
  evaluation, no export (``python -m trainer ... --no-export``), in a fresh
  job folder so the bottleneck features are computed every time.

Each stage runs as a child process (``measure`` from bench_preprocessing:
wall time, and the whole process tree's resident memory sampled from /proc
every 0.1 s). Beside it a second sampler reads every descendant's
``/proc/<pid>/status`` every 0.1 s, keeping each process's ``VmHWM`` (the
kernel's own high-water mark of its resident memory, so a peak between two
samples is not missed) and a 1-second ``VmRSS`` timeline, to show which
process grows. Between the smallest and the largest size it reports the KB
of peak RSS per extra image (largest process and tree) against the 1 KB
target, the growth of wall time against the growth of the image count, and
a straight-line extrapolation to 10 million images.

Run by hand (not a test), from the repository root::

    .venv/bin/python -m bench.bench_scale                        # 10,000 and 100,000 images
    .venv/bin/python -m bench.bench_scale --sizes 5000,50000     # on a busy machine
    .venv/bin/python -m bench.bench_scale --sizes 500,5000 --work /tmp/scale-bench/quick   # a quick look
    .venv/bin/python -m bench.bench_scale --only preprocessing   # the preprocessing job alone

Writes JSON to bench/out/scale-<date>.json (``--json``), a Markdown report to
stdout and, with ``--results``, to that file. A stage that fails is recorded
with the last lines of its log, and the other stages still run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.bench_preprocessing import REPO, image_set, list_images, machine, measure  # measure samples the tree with _tree_rss

TARGET_KB = 1.0          # KB of peak RSS per extra image (issue 16)
EXTRAPOLATE_TO = 10_000_000
_SELF_RSS = "BENCH_SELF_RSS_FILE"   # the name measure() gives the file for the command's own ru_maxrss
_LOG = "BENCH_SCALE_LOG"

# ``python -m MODULE ARGS`` with its stderr (fd 2, so TensorFlow's and Beam's workers' too) in $BENCH_SCALE_LOG
# and its own exact peak RSS (getrusage, KB) written to $BENCH_SELF_RSS_FILE at exit, as measure() expects.
_LAUNCHER = ("import atexit, os, resource, runpy, sys\n"
             "os.dup2(os.open(os.environ['" + _LOG + "'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)\n"
             "atexit.register(lambda: open(os.environ['" + _SELF_RSS + "'], 'w').write("
             "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
             "module = sys.argv[1]\n"
             "sys.argv = [module, *sys.argv[2:]]\n"
             "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


# ---------------------------------------------------------------- inputs

def _make_small(args) -> None:
    path, cls, seed, side = args
    from preprocessing.sample_data import draw_image

    draw_image(cls, random.Random(seed), side, side).save(path, format="JPEG", quality=90)


def small_set(root: Path, count: int, side: int = 32) -> Path:
    """``count`` generated ``side``x``side`` JPEGs in 4 class folders, made by a Pool (cached between runs)."""
    folder = root / f"images-{count}" if side == 32 else root / f"images-{count}-{side}px"
    return image_set(folder, count, _make_small, side, digits=7, chunksize=256)


# ---------------------------------------------------------------- per-process sampling

def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes; (0, 0) once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, hwm


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _label(pid: int) -> tuple[str, str]:
    """(the full command line, a short name for the table) of ``pid``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?", "?"
    argv = [a.decode(errors="replace") for a in argv if a]
    if len(argv) > 2 and argv[1] == "-c" and argv[2] == _LAUNCHER:   # our launcher: python -c CODE MODULE ...
        argv = [argv[0], "-m", *argv[3:]]
    if not argv:
        return "?", "?"
    argv[0] = Path(argv[0]).name
    full = " ".join(argv)
    if len(argv) > 2 and argv[1] == "-m":
        short = " ".join(argv[:3])
    else:   # e.g. sh -c '/venv/bin/python -S /repo/preprocessing/worker.py --attach /tmp/x': names, not paths
        short = " ".join(Path(a).name if a.startswith("/") else a for a in " ".join(argv).split()[:5])
    return full[:400], short[:70]


class ProcessSampler:
    """Every ``interval`` s: every descendant of this process, its VmHWM (kept) and VmRSS (a 1 s timeline)."""

    def __init__(self, interval: float = 0.1, timeline_every: float = 1.0):
        self.interval, self.timeline_every = interval, timeline_every
        self.procs: dict[int, dict] = {}
        self.timeline: list[tuple[float, float, float]] = []   # (s, tree MB, largest MB) from VmRSS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me, next_tick = os.getpid(), 0.0
        while not self._stop.is_set():
            now = time.monotonic() - self.started
            children = _children_map()
            stack, tree, largest = list(children.get(me, [])), 0, 0
            tick = now >= next_tick
            while stack:
                pid = stack.pop()
                stack.extend(children.get(pid, []))
                rss, hwm = _status(pid)
                if not rss and not hwm:
                    continue
                proc = self.procs.get(pid)
                if proc is None:
                    full, short = _label(pid)
                    parent = next((p for p, kids in children.items() if pid in kids), None)
                    if parent in self.procs and self.procs[parent]["command"] == full:
                        short = f"fork of {parent} ({short})"   # a multiprocessing fork keeps its parent's argv
                    proc = self.procs[pid] = {"pid": pid, "ppid": parent, "command": full, "short": short,
                                              "first_s": now, "hwm": 0, "rss_max": 0, "timeline": []}
                proc["hwm"], proc["rss_max"], proc["last_s"] = max(proc["hwm"], hwm), max(proc["rss_max"], rss), now
                if tick:
                    proc["timeline"].append((round(now, 1), round(rss / 2**20, 1)))
                tree, largest = tree + rss, max(largest, rss)
            if tick:
                self.timeline.append((round(now, 1), round(tree / 2**20, 1), round(largest / 2**20, 1)))
                next_tick = now + self.timeline_every
            time.sleep(self.interval)

    def report(self) -> list[dict]:
        rows = []
        for proc in sorted(self.procs.values(), key=lambda p: p["first_s"]):
            tl = [mb for _, mb in proc["timeline"]]
            rows.append({"pid": proc["pid"], "ppid": proc["ppid"], "command": proc["command"],
                         "short": proc["short"], "peak_mb": round(proc["hwm"] / 2**20, 1),
                         "sampled_peak_mb": round(proc["rss_max"] / 2**20, 1),
                         "alive_s": [round(proc["first_s"], 1), round(proc.get("last_s", proc["first_s"]), 1)],
                         # the resident memory at a quarter, half, three quarters of its life and at its last sample
                         "rss_quartiles_mb": [tl[min(len(tl) - 1, int(len(tl) * q))] for q in (0.25, 0.5, 0.75)]
                         + [tl[-1]] if tl else [],
                         "timeline": proc["timeline"]})
        return rows


# ---------------------------------------------------------------- stages

def run_stage(name: str, module_args: list[str], log: Path) -> dict:
    """Run ``python -m MODULE ARGS`` under measure() and the per-process sampler; a failure is recorded."""
    command = [sys.executable, "-c", _LAUNCHER, *module_args]
    shown = "python -m " + " ".join(module_args)
    os.environ[_LOG] = str(log)
    load = os.getloadavg()
    print(f"  {name}: {shown}", file=sys.stderr, flush=True)
    result: dict = {"stage": name, "command": shown, "log": str(log), "load_before": [round(x, 2) for x in load]}
    with ProcessSampler() as sampler:
        try:
            result.update(measure(command))
            result["ok"] = True
        except SystemExit as failure:   # measure() exits on a non-zero return code
            result["ok"] = False
            result["failure"] = str(failure).splitlines()[0]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["processes"] = sampler.report()
    result["tree_timeline"] = sampler.timeline
    hwm = max((p["peak_mb"] for p in result["processes"]), default=0.0)
    # VmHWM misses nothing between samples; measure()'s largest also has the driver's exact getrusage peak
    result["largest_mb"] = max(hwm, result.get("largest_rss_mb", 0.0))
    result["tree_mb"] = result.get("peak_rss_mb", max((t for _, t, _ in sampler.timeline), default=0.0))
    text = log.read_text(errors="replace") if log.exists() else ""
    if not result["ok"]:
        result["log_tail"] = text.splitlines()[-40:]
        print(f"  {name} FAILED: {result['failure']}\n    " + "\n    ".join(result["log_tail"][-15:]),
              file=sys.stderr, flush=True)
    else:
        print(f"  {name}: {result['seconds']:.1f} s, largest process {result['largest_mb']:.0f} MB, "
              f"tree {result['tree_mb']:.0f} MB", file=sys.stderr, flush=True)
    result["log_lines"] = _interesting(text)
    return result


_KEEP = re.compile(r"bottleneck features: \w+, \d+ images in|trial .* done in|found \d+ inputs|test: \d+ examples|"
                   r"retraining|search finished|Traceback|Error")


def _interesting(text: str) -> list[str]:
    return [line for line in text.splitlines() if _KEEP.search(line)][:40]


def _features(lines: list[str]) -> dict:
    """Seconds and images/s of each split's bottleneck-feature extraction, from the trainer's log."""
    found = {}
    for line in lines:
        match = re.search(r"bottleneck features: (\w+), (\d+) images in ([\d.]+)s", line)
        if match:
            found[match.group(1)] = {"images": int(match.group(2)), "seconds": float(match.group(3))}
    return found


def _du_mb(path: Path) -> float:
    try:
        out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
        return int(out.split()[0]) / 1024
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return 0.0


def bench_size(count: int, work: Path, side: int, batch_size: int, with_trainer: bool = True) -> dict:
    started = time.monotonic()
    images = small_set(work, count, side)
    generated_s = time.monotonic() - started
    n = len(list_images(images))
    data, job = work / f"data-{count}", work / f"job-{count}"
    shutil.rmtree(job, ignore_errors=True)   # a fresh job: the bottleneck features are computed every time
    pre = run_stage("preprocessing", ["preprocessing", "--input", str(images), "--output", str(data),
                                      "--image-size", str(side), "--overwrite"], work / f"preprocessing-{count}.log")
    row = {"images": n, "generate_s": round(generated_s, 1), "input_mb": _du_mb(images), "stages": [pre]}
    if pre["ok"]:
        stats = json.loads((data / "stats.json").read_text())
        row["written"] = stats["totals"]["written"]
        row["splits"] = stats.get("written", {})
        row["data_mb"] = _du_mb(data)
        row["shards"] = len(list(data.glob("*.tfrecord")))
    if pre["ok"] and with_trainer:
        search_space = json.dumps({"finetune_depth": 0})
        trainer = run_stage("trainer", [
            "trainer", "--data", str(data), "--job-dir", str(job), "--weights", "none", "--image-size", str(side),
            "--backbone", "mobilenet_v2", "--tuner", "random", "--max-trials", "1", "--epochs", "1",
            "--final-epochs", "1", "--batch-size", str(batch_size), "--search-space", search_space,
            "--no-export", "--overwrite"], work / f"trainer-{count}.log")
        trainer["features"] = _features(trainer["log_lines"])
        row["cache_mb"] = _du_mb(job / "cache")
        row["stages"].append(trainer)
    for stage in row["stages"]:
        if stage["ok"]:
            stage["images_per_s"] = n / stage["seconds"]
    return row


# ---------------------------------------------------------------- report

def _stage(row: dict, name: str) -> dict | None:
    return next((s for s in row["stages"] if s["stage"] == name and s["ok"]), None)


def scaling(rows: list[dict]) -> list[dict]:
    """Per stage, between each two consecutive sizes (and the smallest and the largest when there are more than
    two): KB of peak RSS per extra image, time growth, and straight lines through the two points to 10 million."""
    if len(rows) < 2:
        return []
    pairs = list(zip(rows, rows[1:])) + ([(rows[0], rows[-1])] if len(rows) > 2 else [])
    out = []
    for small, large in pairs:
        out += _scaling_pair(small, large)
    return out


def _scaling_pair(small: dict, large: dict) -> list[dict]:
    extra = large["images"] - small["images"]
    out = []
    for name in ("preprocessing", "trainer"):
        if not any(s["stage"] == name for row in (small, large) for s in row["stages"]):
            continue   # not run (--only)
        a, b = _stage(small, name), _stage(large, name)
        if not a or not b:
            out.append({"stage": name, "from": small["images"], "to": large["images"], "missing": True})
            continue
        kb_largest = (b["largest_mb"] - a["largest_mb"]) * 1024 / extra
        kb_tree = (b["tree_mb"] - a["tree_mb"]) * 1024 / extra
        per_image_s = (b["seconds"] - a["seconds"]) / extra
        out.append({
            "stage": name, "from": small["images"], "to": large["images"],
            "kb_per_image_largest": kb_largest, "kb_per_image_tree": kb_tree,
            "target_met_largest": kb_largest < TARGET_KB, "target_met_tree": kb_tree < TARGET_KB,
            "image_ratio": large["images"] / small["images"], "time_ratio": b["seconds"] / a["seconds"],
            "marginal_ms_per_image": per_image_s * 1000,
            "fixed_s": a["seconds"] - per_image_s * small["images"],
            # straight lines through the two points, to EXTRAPOLATE_TO images
            "extrapolated_s": b["seconds"] + per_image_s * (EXTRAPOLATE_TO - large["images"]),
            "extrapolated_largest_mb": b["largest_mb"] + kb_largest / 1024 * (EXTRAPOLATE_TO - large["images"]),
            "extrapolated_tree_mb": b["tree_mb"] + kb_tree / 1024 * (EXTRAPOLATE_TO - large["images"]),
        })
    return out


def markdown(result: dict) -> str:
    rows, lines = result["rows"], []
    lines += ["| stage | N | wall s | images/s | largest-process peak MB | tree peak MB | processes "
              "| load before -> after |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        for s in row["stages"]:
            if not s["ok"]:
                lines.append(f"| {s['stage']} | {row['images']:,} | FAILED | | | | {len(s['processes'])} "
                             f"| {s['load_before'][0]:.1f} -> {s['load_after'][0]:.1f} |")
                continue
            lines.append(f"| {s['stage']} | {row['images']:,} | {s['seconds']:.1f} | {s['images_per_s']:.0f} "
                         f"| {s['largest_mb']:.0f} | {s['tree_mb']:.0f} | {len(s['processes'])} "
                         f"| {s['load_before'][0]:.1f} -> {s['load_after'][0]:.1f} |")
    lines += ["", "Every process of every stage (peak = the kernel's VmHWM; RSS at 1/4, 1/2, 3/4 of its life and "
              "at its last sample):", "",
              "| stage | N | process (pid, parent) | alive s | peak MB | RSS 1/4, 1/2, 3/4, end MB |",
              "|---|---:|---|---|---:|---|"]
    for row in rows:
        for s in row["stages"]:
            for p in s["processes"]:
                q = ", ".join(f"{x:.0f}" for x in p["rss_quartiles_mb"])
                lines.append(f"| {s['stage']} | {row['images']:,} | `{p['short']}` ({p['pid']}, {p['ppid']}) "
                             f"| {p['alive_s'][0]:.0f}-"
                             f"{p['alive_s'][1]:.0f} | {p['peak_mb']:.0f} | {q} |")
    feats = [(row["images"], split, f) for row in rows for s in row["stages"] if s["stage"] == "trainer"
             for split, f in s.get("features", {}).items()]
    if feats:
        lines += ["", "Trainer's bottleneck-feature extraction (from its log): "
                  + "; ".join(f"N={n:,} {split} {f['images']:,} images in {f['seconds']:.1f} s "
                              f"({f['images'] / max(f['seconds'], 1e-9):.0f}/s)" for n, split, f in feats)]
    lines += ["", "Disk: " + "; ".join(
        f"N={row['images']:,}: input {row['input_mb']:.0f} MB, TFRecords {row.get('data_mb', 0):.0f} MB "
        f"({row.get('shards', 0)} shards), feature cache {row.get('cache_mb', 0):.0f} MB" for row in rows)]
    scale = result["scaling"]
    if scale:
        lines += ["", "| stage | N | KB peak RSS per extra image, largest process | tree | target < 1 KB "
                  "| wall-time ratio (image ratio) | marginal ms/image | fixed s |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        for g in scale:
            if g.get("missing"):
                lines.append(f"| {g['stage']} | {g['from']:,} -> {g['to']:,} | a run failed | | | | | |")
                continue
            met = ("met" if g["target_met_largest"] else "**not met**") + " / " + \
                  ("met" if g["target_met_tree"] else "**not met**")
            lines.append(f"| {g['stage']} | {g['from']:,} -> {g['to']:,} | {g['kb_per_image_largest']:.3f} "
                         f"| {g['kb_per_image_tree']:.3f} | {met} | {g['time_ratio']:.2f} ({g['image_ratio']:.0f}) "
                         f"| {g['marginal_ms_per_image']:.2f} | {g['fixed_s']:.1f} |")
        lines += ["", f"Straight lines through the two points, to {EXTRAPOLATE_TO:,} images:", ""]
        for g in scale:
            if not g.get("missing"):
                lines.append(f"* {g['stage']}, from {g['from']:,} -> {g['to']:,}: "
                             f"{g['extrapolated_s'] / 3600:.1f} h; largest process "
                             f"{g['extrapolated_largest_mb'] / 1024:.2f} GB, "
                             f"tree {g['extrapolated_tree_mb'] / 1024:.2f} GB")
    for row in rows:
        for s in row["stages"]:
            if not s["ok"]:
                lines += ["", f"{s['stage']} at {row['images']:,} images failed: {s['failure']}", "", "```",
                          *s["log_tail"][-20:], "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="image counts, smallest and largest >= 10x apart "
                        "(default %(default)s)")
    parser.add_argument("--work", default="/tmp/scale-bench", help="images, data, jobs and logs (default %(default)s)")
    parser.add_argument("--image-px", type=int, default=32, help="side of the generated images and of both stages' "
                        "image size (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="trainer batch size (default %(default)s)")
    parser.add_argument("--json", help="JSON output (default bench/out/scale-<date>.json)")
    parser.add_argument("--results", help="also write the Markdown report to this file")
    parser.add_argument("--only", choices=("preprocessing",), help="run only this stage (the trainer needs the "
                        "preprocessing output, so only the preprocessing stage can run alone)")
    args = parser.parse_args()

    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    if len(sizes) < 2 or sizes[-1] < 10 * sizes[0]:
        print(f"note: sizes {sizes} are not two sizes at least 10x apart", file=sys.stderr)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc)
    json_path = Path(args.json or REPO / "bench" / "out" / f"scale-{when:%Y-%m-%d}.json")
    load_before, started = os.getloadavg(), time.monotonic()
    rows = []
    for count in sizes:
        print(f"{count:,} images ({args.image_px} px) in {work} ...", file=sys.stderr, flush=True)
        rows.append(bench_size(count, work, args.image_px, args.batch_size, with_trainer=args.only is None))
    result = {"date": when.isoformat(timespec="seconds"), "machine": machine(),
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "nproc": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()], "total_s": round(time.monotonic() - started, 1),
              "argv": sys.argv[1:], "rows": rows}
    result["scaling"] = scaling(rows)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    report = "\n".join([
        f"Measured {result['date']} on {result['machine']}; load average (1/5/15 min) before "
        + "/".join(f"{x:.2f}" for x in result["load_before"]) + ", after "
        + "/".join(f"{x:.2f}" for x in result["load_after"]) + f"; total {result['total_s'] / 60:.1f} min "
        f"(image generation included). JSON: {json_path}",
        "", markdown(result)])
    print(report)
    if args.results:
        Path(args.results).write_text(report + "\n")


if __name__ == "__main__":
    main()
