"""RunInference's model handler for this project's exports: ``serving_default`` on a batch of encoded image files.

Why not Beam's own ``TFModelHandlerTensor`` (``apache_beam.ml.inference.tensorflow_inference``,
Beam 2.77): it cannot run this signature.

* That module imports ``tensorflow_hub`` when it is imported, and neither this
  project nor ``apache-beam[tfrecord]`` depends on it.
* Its loader is ``tf.keras.models.load_model(hub.resolve(uri))``: under Keras 3
  that loads ``.keras`` and ``.h5`` files only, not a TensorFlow SavedModel.
* Its inference is ``model(tf.stack(batch))``, the Keras model's ``__call__`` on
  stacked numeric tensors. The export's contract (docs/contracts.md, section 4)
  is a signature whose input ``image_bytes`` is a 1-D string tensor of
  original files, decoded and resized inside the graph.

So :class:`SavedModelBytesHandler` subclasses the public
``apache_beam.ml.inference.base.ModelHandler``: ``load_model`` loads the
version with ``tf.saved_model.load`` and ``run_inference`` calls
``serving_default`` on the batch's bytes. Both go through
:class:`serving.servable.LoadedVersion`, the development server's servable:
the same load, the same signature call and the same error messages as a
Predict request, so the decode is the serving graph's and a prediction equals
the server's. ``RunInference`` keeps one loaded model per worker process
(its shared handle) and batches with ``BatchElements``
(``--min-batch-size``/``--max-batch-size``).

**One bad file fails one image, not its batch.** The graph decodes the whole
batch in one call, so an undecodable file fails the call (``INVALID_ARGUMENT``,
e.g. ``Unknown image file format``, a corrupt JPEG, an image over the pixel
limit). Then each image of that batch runs alone: the good ones get their
prediction, each bad one its reason (the server's one-line message). Any other
failure (out of memory, a broken model) is raised and fails the bundle, as it
should: it is not the file's fault.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from serving.errors import ServingError
from trainer.publish.export import INPUT_NAME, SIGNATURE_NAME

MODEL_NAME = "classifier"
_log = logging.getLogger("preprocessing.serving_batch")  # shown by the local runner's workers (preprocessing.worker)
_NO_RESOURCE = "Resource module is not available for current platform"


def _not_beams_resource_warning(record: logging.LogRecord) -> bool:
    """Beam 2.77's ``ml.inference.base`` sets ``resource = None`` whenever its optional ``model_manager`` import
    fails (it does here), then warns on the root logger at each model load that memory cannot be measured."""
    return not str(record.msg).startswith(_NO_RESOURCE)


logging.getLogger().addFilter(_not_beams_resource_warning)


class SavedModelBytesHandler(ModelHandler[bytes, PredictionResult, Any]):
    """Encoded image files in, ``PredictionResult(file bytes, probabilities or an error reason)`` out.

    ``inference`` is the row of ``probabilities`` (float32, ``labels.txt``
    order) or, for a file the graph refused, the reason as a ``str``.
    ``threads`` caps TensorFlow's intra-op threads in each worker (the local
    runner sets it so that its workers together use the cores once).
    """

    def __init__(self, version_dir: str, version: int | None, *, min_batch_size: int, max_batch_size: int,
                 threads: int | None = None, quiet: bool = True) -> None:
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size)
        self.version_dir = version_dir
        self.version = version
        self.threads = threads
        self.quiet = quiet

    def load_model(self):
        """Load the version once per worker process (``RunInference``'s shared handle) and warm it up.

        TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are hidden unless
        the driver ran with ``--verbose`` (:func:`preprocessing.console.stderr_silenced`);
        the version's own warm-up requests are replayed, as TF Serving does,
        so the first batch is not the one that pays for tracing.
        """
        import contextlib

        from preprocessing.console import stderr_silenced

        started = time.monotonic()
        with stderr_silenced() if self.quiet else contextlib.nullcontext():
            loaded = self._load()
        _log.info("loaded model version %s in %.1fs (%s)", self.version, time.monotonic() - started,
                  self.version_dir)
        return loaded

    def _load(self):
        import tensorflow as tf

        from serving.servable import LoadedVersion

        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            except RuntimeError:  # TensorFlow already ran an op in this process (an in-memory runner)
                pass
        loaded = LoadedVersion(MODEL_NAME, self.version or 0, self.version_dir)
        signature = loaded.signature(SIGNATURE_NAME)
        if INPUT_NAME not in signature.inputs or signature.inputs[INPUT_NAME].dtype != tf.string.as_datatype_enum:
            raise ValueError(f"{self.version_dir}: signature {SIGNATURE_NAME} does not take {INPUT_NAME} "
                             "(DT_STRING): not an export of this project's trainer (docs/contracts.md, section 4)")
        loaded.warm_up()
        return loaded

    def run_inference(self, batch: Sequence[bytes], model, inference_args: dict | None = None
                      ) -> Iterable[PredictionResult]:
        try:
            probabilities = self._probabilities(model, batch)
        except ServingError as error:
            if error.code.name != "INVALID_ARGUMENT":
                raise
            return [self._one(model, data) for data in batch]
        return [PredictionResult(data, row) for data, row in zip(batch, probabilities)]

    def _one(self, model, data: bytes) -> PredictionResult:
        try:
            return PredictionResult(data, self._probabilities(model, [data])[0])
        except ServingError as error:
            if error.code.name != "INVALID_ARGUMENT":
                raise
            return PredictionResult(data, error.message or "the model refused the file")

    @staticmethod
    def _probabilities(model, batch: Sequence[bytes]) -> np.ndarray:
        array = np.empty(len(batch), dtype=object)
        array[:] = [bytes(data) for data in batch]
        return model.run(SIGNATURE_NAME, {INPUT_NAME: array})["probabilities"]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(data) for data in batch)

    def get_metrics_namespace(self) -> str:
        return "BatchPredict"
