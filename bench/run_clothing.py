"""The whole pipeline on the real clothing-small photos (run by hand, not a test).

Preprocessing (Beam) -> a Keras Tuner search with fine-tuning on the shared
ImageNet MobileNetV2 weights -> export -> the development server -> the test
split through the gRPC client. Writes its report as the clothing section of
``bench/RESULTS.md`` (the confusion matrix PNG beside it): test accuracy
through gRPC next to the trainer's own evaluation of the same model, per-class
F1, the wall time of each stage, and the tuner's table.

    .venv/bin/python -m bench.run_clothing [--workdir bench/out/clothing] [--tuner hyperband] ...

Every flag not listed in ``--help`` goes to the trainer unchanged
(e.g. ``--final-epochs 8 --patience 3``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time

from scripts.demo import DemoConfig, run

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, os.pardir, os.pardir, "shared"))


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model or platform.processor()}), no GPU, Python {platform.python_version()}"


def _trials_table(tuner_dir: str, limit: int = 15) -> str:
    path = os.path.join(tuner_dir, "trials.csv")
    if not os.path.exists(path):
        return "(no trials.csv)"
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    fixed = {"rank", "trial_id", "number", "status", "score", "best_step", "elapsed_s", "message"}
    hp_names = [name for name in (rows[0].keys() if rows else []) if name not in fixed]
    lines = ["| rank | trial | status | val_accuracy | time | " + " | ".join(hp_names) + " |",
             "|" + "---|" * (5 + len(hp_names))]
    for row in rows[:limit]:
        score = f"{float(row['score']):.4f}" if row.get("score") else ""
        values = []
        for name in hp_names:
            value = row.get(name, "")
            try:
                number = float(value)
                value = f"{number:.3g}" if not number.is_integer() else str(int(number))
            except ValueError:
                pass
            values.append(value)
        elapsed = f"{float(row['elapsed_s']) / 60:.1f} min" if row.get("elapsed_s") else "?"
        lines.append(f"| {row['rank']} | {row['trial_id']} | {row['status']} | {score} | {elapsed} | "
                     + " | ".join(values) + " |")
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more trials in {path})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run_clothing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "clothing"))
    parser.add_argument("--input", default=os.path.join(SHARED, "datasets", "clothing-small"))
    parser.add_argument("--weights", default=os.path.join(SHARED, "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tuner", default="hyperband")
    parser.add_argument("--max-trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"),
                        help="the report's section between the clothing markers is replaced (appended if absent)")
    args, trainer_args = parser.parse_known_args()

    config = DemoConfig(workdir=args.workdir, input=args.input, image_size=args.image_size, weights=args.weights,
                        tuner=args.tuner, max_trials=args.max_trials, epochs=args.epochs,
                        batch_size=args.batch_size, extra_train_args=tuple(trainer_args))
    started = time.monotonic()
    result = run(config)
    total = time.monotonic() - started

    with open(os.path.join(result.job_dir, "eval", "metrics.json")) as handle:
        metrics = json.load(handle)
    with open(os.path.join(result.job_dir, "best_hyperparameters.json")) as handle:
        best = json.load(handle)
    figure = os.path.join(os.path.dirname(args.results), "clothing_confusion_matrix.png")
    shutil.copyfile(os.path.join(result.job_dir, "eval", "confusion_matrix.png"), figure)

    low, high = metrics["accuracy_ci95"]
    per_class = "\n".join(
        f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in metrics["per_class"].items())
    stages = "\n".join(f"| {name} | {seconds:.0f} s |" for name, seconds in result.seconds.items())
    command = "python -m bench.run_clothing " + " ".join(
        [f"--tuner {args.tuner} --max-trials {args.max_trials} --epochs {args.epochs} "
         f"--image-size {args.image_size} --batch-size {args.batch_size}", *trainer_args])
    text = f"""## The whole pipeline on clothing-small (real photos, shared ImageNet MobileNetV2 weights)

Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {_machine()}.
Command: `{command}` (total {total / 60:.1f} min).

### Accuracy on the test split ({metrics['num_examples']} photos, 10 classes)
| path | accuracy |
|---|---|
| trainer's own evaluation of the exported model (`eval/metrics.json`) | {result.trainer_accuracy:.4f} |
| the same test records through gRPC (development server, `serving.client`) | {result.record_accuracy:.4f} |
| the original test photos through gRPC (decoded and resized inside the SavedModel) | {result.accuracy:.4f} |

Top-{metrics.get('top_k', 3)} accuracy {metrics.get('top_k_accuracy', float('nan')):.4f}; macro F1 {metrics['macro_avg']['f1']:.4f}.
95% interval of the test accuracy (Wilson, {metrics['num_examples']} photos): {low:.3f}-{high:.3f}; one photo is
{100 / metrics['num_examples']:.2f} points, so runs and targets closer than the interval's half-width are not told apart.
Baselines from `../shared/weights/SOURCE.md`: a linear classifier on the frozen features reaches 88.4%, a short
fine-tune of the top 20 layers 88.7%. Target: 92%.

Best hyperparameters (trial {best.get('trial_id')}, val_accuracy {best.get('score', float('nan')):.4f}):
`{json.dumps(best.get('values', {}), sort_keys=True)}`

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

![confusion matrix](clothing_confusion_matrix.png)

### Wall time of each stage
| stage | time |
|---|---|
{stages}

### The tuner's table (best first)
{_trials_table(os.path.join(result.job_dir, 'tuner'))}
"""
    update_section(args.results, text)
    print(f"wrote the clothing section of {args.results}")


BEGIN, END = "<!-- clothing: begin (written by bench/run_clothing.py) -->", "<!-- clothing: end -->"


def update_section(path: str, text: str) -> None:
    """Replace the text between the clothing markers of ``path`` (append them when absent; atomic)."""
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    with open(path + ".tmp", "w") as handle:
        handle.write(new)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
