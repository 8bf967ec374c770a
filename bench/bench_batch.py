"""Benchmark (issue 19): the batch prediction job (Beam RunInference) against an in-process batched predict loop.

Both score the same generated files with the same exported SavedModel and the
same batch size, and both run as a child process measured by
:func:`bench.bench_preprocessing.measure` (wall time, CPU time, peak RSS of
the process tree):

* **job**: ``python -m serving.batch --model EXPORT --input IMAGES --output OUT
  --min-batch-size B --max-batch-size B --direct_num_workers=2`` (the local
  multi-process runner: two workers, each loading the model once), which also
  writes its JSON lines, ``predictions.csv``, ``errors.jsonl`` and
  ``summary.json``;
* **loop**: this file with ``--loop``: import TensorFlow, load the SavedModel
  once, then read the files in order and call ``serving_default`` on each
  batch of B, keeping the outputs. It reports its phases (import, load,
  predict) so that the predict phase alone is a second, stricter baseline.

The ratios: **end to end** (process against process, both including Python,
TensorFlow and model start-up) and **against the loop's predict phase**
(the job's whole run against the loop's steady state). Rounds alternate job
and loop; the median and best of each are reported, with the load average.

The export is trained once on the generated sample dataset by the project's
own commands (``preprocessing.sample_data``, ``preprocessing``, ``trainer
--weights none --image-size 32``, one trial of one epoch), cached in the work
folder, as are the images (``bench_preprocessing.generated_set``: photo-sized
300-640 px JPEGs in 4 class folders; ``--small`` uses bench_scale's 32 px ones).

Run by hand (not a test), from the repository root::

    nice -n 5 .venv/bin/python -m bench.bench_batch                       # 5,000 photos, batch 64, 3 rounds
    nice -n 5 .venv/bin/python -m bench.bench_batch --images 1000 --rounds 1   # a quick look

Prints a Markdown report; ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.bench_preprocessing import REPO, generated_set, list_images, machine, measure

TARGET = 0.8
WORK = Path("/tmp/batch-bench")


# ---------------------------------------------------------------- the loop (child process)

def loop(images_dir: str, version_dir: str, batch: int, report: str) -> None:
    """Import TensorFlow, load the SavedModel once, call its signature on batches of ``batch`` files."""
    started = time.monotonic()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    imported = time.monotonic()
    signature = tf.saved_model.load(version_dir).signatures["serving_default"]
    loaded = time.monotonic()
    paths = list_images(Path(images_dir))
    kept = []
    for start in range(0, len(paths), batch):
        data = []
        for path in paths[start:start + batch]:
            with open(path, "rb") as handle:
                data.append(handle.read())
        outputs = signature(image_bytes=tf.constant(data))
        kept.append(outputs["probabilities"].numpy())
    done = time.monotonic()
    Path(report).write_text(json.dumps({"images": sum(len(k) for k in kept), "import_s": imported - started,
                                        "load_s": loaded - imported, "predict_s": done - loaded}))


# ---------------------------------------------------------------- the export

def _run(command: list[str]) -> None:
    print("  $ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def build_export(work: Path) -> Path:
    """A small classifier trained by the project's commands on the generated sample (cached in ``work``)."""
    version = work / "job" / "export" / "1"
    if version.is_dir():
        return version
    py = sys.executable
    _run([py, "-m", "preprocessing.sample_data", str(work / "sample"), "--per-class", "40", "--seed", "0"])
    _run([py, "-m", "preprocessing", "--input", str(work / "sample"), "--output", str(work / "data"),
          "--image-size", "32", "--overwrite"])
    _run([py, "-m", "trainer", "--data", str(work / "data"), "--job-dir", str(work / "job"), "--weights", "none",
          "--image-size", "32", "--epochs", "1", "--max-trials", "1", "--tuner", "random", "--overwrite"])
    return version


# ---------------------------------------------------------------- one round each

def job_round(images: Path, export: Path, out: Path, batch: int, workers: int) -> dict:
    command = [sys.executable, "-m", "serving.batch", "--model", str(export), "--input", str(images),
               "--output", str(out), "--overwrite", "--progress-seconds", "0", "--min-batch-size", str(batch),
               "--max-batch-size", str(batch), f"--direct_num_workers={workers}"]
    result = measure(command)
    summary = json.loads((out / "summary.json").read_text())
    result.update(images=summary["counts"]["found"], predicted=summary["counts"]["predicted"],
                  accounted=summary["accounted"], job_seconds=summary["run"]["seconds"],
                  command="python -m serving.batch " + " ".join(command[3:]))
    return result


def loop_round(images: Path, export: Path, batch: int, work: Path) -> dict:
    report = work / "loop.json"
    result = measure([sys.executable, "-m", "bench.bench_batch", "--loop", str(images), str(export), str(batch),
                      str(report)])
    result.update(json.loads(report.read_text()))
    return result


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    export = build_export(work)
    if args.small:
        from bench.bench_scale import small_set

        images = small_set(work, args.images)
    else:
        images = generated_set(work, args.images)
    count = len(list_images(images))
    rounds = []
    for index in range(args.rounds):
        load = os.getloadavg()[0]
        job = job_round(images, export, work / "out", args.batch, args.workers)
        loop_ = loop_round(images, export, args.batch, work)
        assert job["predicted"] == loop_["images"] == count, (job, loop_, count)
        rounds.append({"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                       "job": job, "loop": loop_})
        print(f"  round {index + 1}: job {job['seconds']:.1f} s, loop {loop_['seconds']:.1f} s "
              f"(predict phase {loop_['predict_s']:.1f} s), load {load:.1f}", file=sys.stderr, flush=True)
    return {"measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "images": count, "image_kind": "32x32 JPEG" if args.small else "300-640 px JPEG", "batch": args.batch,
            "workers": args.workers, "export": str(export), "rounds": rounds,
            "command": "nice -n 5 .venv/bin/python -m bench.bench_batch " + " ".join(sys.argv[1:])}


def _rates(result: dict) -> dict:
    n = result["images"]
    job = [n / r["job"]["seconds"] for r in result["rounds"]]
    loop_ = [n / r["loop"]["seconds"] for r in result["rounds"]]
    predict = [n / r["loop"]["predict_s"] for r in result["rounds"]]
    inside = [n / r["job"]["job_seconds"] for r in result["rounds"]]
    pairs = list(zip(job, loop_, predict))
    return {"job": job, "loop": loop_, "predict": predict, "inside": inside,
            "end_to_end": [j / lp for j, lp, _ in pairs], "vs_predict": [j / p for j, _, p in pairs]}


def render(result: dict) -> str:
    rates = _rates(result)

    def fig(values: list[float], digits: int = 1) -> str:
        return f"{statistics.median(values):.{digits}f} (best {max(values):.{digits}f})"

    loads = [r["load_before"] for r in result["rounds"]] + [r["load_after"] for r in result["rounds"]]
    first = result["rounds"][0]
    lines = [
        f"Measured {result['measured']} on {result['machine']}; load average {min(loads):.1f}-{max(loads):.1f} "
        "(other jobs on the same cores).",
        f"{result['images']:,} generated {result['image_kind']} files in 4 class folders, batch {result['batch']}, "
        f"{result['workers']} local workers, {len(result['rounds'])} round(s), median (best).",
        f"Command: `{result['command']}`",
        "",
        "| what | images/s | ratio (job / loop) |",
        "|---|---|---|",
        f"| job, whole process (`python -m serving.batch`, {result['workers']} workers) | {fig(rates['job'])} | |",
        f"| job, its own run (`summary.json`: from staging to published) | {fig(rates['inside'])} | |",
        f"| loop, whole process (import TF, load, read + predict) | {fig(rates['loop'])} | "
        f"**{fig(rates['end_to_end'], 2)}** end to end |",
        f"| loop, predict phase only (files read + signature calls) | {fig(rates['predict'])} | "
        f"{fig(rates['vs_predict'], 2)} against the steady state |",
        "",
        "| round | job s | job CPU s | job peak MB (tree) | loop s | loop import / load / predict s | loop CPU s | "
        "loop peak MB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, r in enumerate(result["rounds"], 1):
        job, lp = r["job"], r["loop"]
        lines.append(f"| {index} | {job['seconds']:.1f} | {job['cpu_seconds']:.1f} | {job['peak_rss_mb']:.0f} | "
                     f"{lp['seconds']:.1f} | {lp['import_s']:.1f} / {lp['load_s']:.1f} / {lp['predict_s']:.1f} | "
                     f"{lp['cpu_seconds']:.1f} | {lp['peak_rss_mb']:.0f} | {r['load_before']:.1f} |")
    lines += ["", f"Job command: `{first['job']['command']}`; every input accounted for: "
                  f"{all(r['job']['accounted'] for r in result['rounds'])}."]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--loop"]:
        loop(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="generated files (default %(default)s)")
    parser.add_argument("--small", action="store_true", help="32x32 JPEGs (bench_scale) instead of photo-sized ones")
    parser.add_argument("--batch", type=int, default=64, help="batch size of both (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="the job's local workers (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="job and loop, alternated (default %(default)s)")
    parser.add_argument("--work", default=str(WORK), help="cache of the images and the export (default %(default)s)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(render(result))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
