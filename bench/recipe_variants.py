"""Does a change of the training recipe move clothing-small's accuracy? (run by hand; RESULTS-trainer.md section 4)

Reuses the job folder of a finished ``python -m bench.run_clothing --finetune-cache 4``
run (its TFRecords, bottleneck cache, 4-view activation cache and best
hyperparameters), so a variant costs one trial (about 5 minutes on two CPU
cores) instead of a whole pipeline (70 minutes):

* ``--change`` (repeatable; none: the trainer as shipped): retrain the best
  hyperparameters with ``no-class-weights``, ``plateau`` (ReduceLROnPlateau,
  factor 0.2, patience 1, in both phases) and/or ``long-head`` (the head
  trained to convergence, up to 100 epochs, before the fine-tune). Phase 2
  reads the activation cache, as the search's trials do. Only the validation
  split is read: a recipe is chosen on validation, never on test.
* ``--posthoc``: two changes that need no training, applied to the exported
  model: undoing the class weights' shift of the decision (dividing the
  probabilities by the weights to the power 0.5 and 1) and averaging with the
  horizontally flipped image (test-time augmentation); on validation, then on
  test.
* ``--hyperparameters FILE``: retrain other values than the run's best, e.g.
  a deeper ``finetune_depth``; the activation cache below that depth's
  boundary is written first when the run has none (minutes).

Usage::

    .venv/bin/python -m bench.recipe_variants                      # as shipped
    .venv/bin/python -m bench.recipe_variants --change no-class-weights --change plateau
    .venv/bin/python -m bench.recipe_variants --posthoc
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
WEIGHTS = os.path.join(os.path.dirname(REPO), "shared", "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")
CHANGES = ("no-class-weights", "plateau", "long-head")
VIEWS, SEED, BATCH = 4, 0, 32  # what bench.run_clothing --finetune-cache 4 used


def _trainer_inputs(job: str, data_dir: str, class_weights: bool, size: tuple[int, int], best: dict):
    from trainer.data import info as data_info
    from trainer.data import activations, features, records
    from trainer.model import backbones, classifier
    from trainer.data.inputs import TrialInputs
    from trainer.search import hypermodel
    from trainer.search import space as search_space
    from trainer.config import AugmentConfig

    info = data_info.inspect_data(data_dir, 0.2)
    backbone = backbones.get_backbone("mobilenet_v2")
    probe = backbone.build(size, WEIGHTS)
    boundary = classifier.boundary_layer(backbone, probe, best["finetune_depth"])
    pooled = features.FeatureCache(os.path.join(job, "cache"), backbone, WEIGHTS, size, info, keep_maps=False)
    acts = activations.ActivationCache(os.path.join(job, "cache"), backbone, WEIGHTS, size, info,
                                          boundary=boundary, views=VIEWS, augment=AugmentConfig(), seed=SEED)
    if not os.path.isdir(pooled.path):
        raise SystemExit(f"{job}: no bottleneck cache; run python -m bench.run_clothing "
                         f"--finetune-cache {VIEWS} first")
    if not os.path.isdir(acts.path):
        print(f"no activation cache below {boundary} (a deeper fine-tune than the run's); writing it to {acts.path}",
              flush=True)
        acts.ensure()
    inputs = TrialInputs(
        lambda split, pooling=None: pooled.dataset(split, BATCH, shuffle=split == "train", seed=SEED,
                                                     pooling=pooling),
        None, data_info.class_weights(info) if class_weights else None,
        activations=lambda split: acts.dataset(split, BATCH, shuffle=split == "train", seed=SEED),
        boundary=boundary, max_cached_depth=best["finetune_depth"])
    return info, backbone, best, inputs, len(backbone.blocks(probe))


def run_variant(changes: list[str], job: str, data_dir: str, epochs: int, size: tuple[int, int], best: dict) -> dict:
    import keras
    import keras_tuner as kt

    from trainer.model import classifier

    from trainer.search import hypermodel
    from trainer.search import space as search_space

    info, backbone, best, inputs, blocks = _trainer_inputs(job, data_dir, "no-class-weights" not in changes, size, best)
    space = search_space.resolve_space({k: {"value": v} for k, v in best.items()}, num_blocks=blocks,
                                     num_train=info.size("train"))

    class Variant(hypermodel.TransferHyperModel):
        def _callbacks(self, callbacks):
            extra = [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=1)]
            return super()._callbacks(callbacks) + (extra if "plateau" in changes else [])

    model_builder = Variant(backbone, WEIGHTS, size, info.num_classes, space, inputs, epochs=epochs)
    hp = kt.HyperParameters()
    for name, value in best.items():
        hp.Fixed(name, value)
    model = model_builder.build(hp)
    history = {}
    if "long-head" in changes:
        head_only = hp.copy()
        head_only.values["finetune_depth"] = 0
        model_builder.fit(head_only, model, epochs=100)
        history["phase1"] = model_builder.last_history["phase1"]
        hp.Fixed("tuner/trial_id", "head")  # a warm start: fit skips phase 1
    result = model_builder.fit(hp, model, epochs=epochs)
    history.update(model_builder.last_history)
    return {"changes": changes, "validation": result,
            "epochs": {phase: len(h["loss"]) for phase, h in history.items()},
            "val_accuracy": {phase: [round(v, 4) for v in h["val_accuracy"]] for phase, h in history.items()}}


def posthoc(job: str, data_dir: str) -> list[str]:
    import numpy as np
    import tensorflow as tf

    from trainer.data import info as data_info

    from trainer.data import records

    info = data_info.inspect_data(data_dir, 0.2)
    serve = tf.saved_model.load(os.path.join(job, "export", "1")).signatures["serving_default"]
    weights = data_info.class_weights(info)
    weights = np.array([weights[i] for i in range(info.num_classes)])

    def probabilities(images):
        return np.concatenate([serve(image_bytes=tf.constant(images[i:i + BATCH]))["probabilities"].numpy()
                               for i in range(0, len(images), BATCH)])

    lines = []
    for split in ("validation", "test"):
        images, labels = records.encoded_examples(info, split)
        labels = np.array(labels)
        flipped = [tf.io.encode_png(tf.io.decode_image(e, channels=3, expand_animations=False)[:, ::-1]).numpy()
                   for e in images]  # PNG: the flip is the only change the model sees
        plain, mirrored = probabilities(images), probabilities(flipped)

        def right(p):
            return int((p.argmax(1) == labels).sum())

        lines.append(f"{split} ({len(labels)} images): as exported {right(plain)}; class-weight shift undone "
                     f"(power 0.5) {right(plain / weights ** 0.5)}, (power 1) {right(plain / weights)}; "
                     f"flipped images {right(mirrored)}; flip averaged (TTA) {right(plain + mirrored)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "clothing"),
                        help="the --workdir of a finished bench.run_clothing --finetune-cache 4 run")
    parser.add_argument("--change", action="append", choices=CHANGES, default=[],
                        help="one change to the shipped recipe (repeat for several)")
    parser.add_argument("--posthoc", action="store_true", help="the no-training variants on the exported model")
    parser.add_argument("--epochs", type=int, default=15, help="most epochs per phase (the run's --final-epochs)")
    parser.add_argument("--image-size", type=int, default=224, help="the run's --image-size")
    parser.add_argument("--hyperparameters", default=None, metavar="FILE",
                        help="a best_hyperparameters.json to retrain (default: the run's own), e.g. the 224 px "
                             "run's best on a 256 px run's caches")
    args = parser.parse_args()
    job, data_dir = os.path.join(args.workdir, "job"), os.path.join(args.workdir, "data")
    if args.posthoc:
        print("\n".join(posthoc(job, data_dir)))
    else:
        with open(args.hyperparameters or os.path.join(job, "best_hyperparameters.json")) as handle:
            best = json.load(handle)["values"]
        size = (args.image_size, args.image_size)
        print(json.dumps(run_variant(sorted(set(args.change)), job, data_dir, args.epochs, size, best)))


if __name__ == "__main__":
    main()
