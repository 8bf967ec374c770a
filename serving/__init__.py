"""serving stage: the client library and CLIs, the development server, and the real TF Serving's configs.

``TF_SERVING_IMAGE`` is the ``tensorflow/serving`` release production runs
(k8s/base/serving/deployment.yaml, serving/config/README.md): the newest one
published. TF Serving's releases trail TensorFlow's by months, so it is built
on an older TensorFlow (``TF_SERVING_TENSORFLOW``) than the trainer's; every
export is checked against that TensorFlow by ``bench/serving_runtime.py``. If
the two ever disagree, the trainer's TensorFlow pin follows this one.
"""

TF_SERVING_VERSION = "2.20.0"
TF_SERVING_IMAGE = f"tensorflow/serving:{TF_SERVING_VERSION}"
TF_SERVING_TENSORFLOW = "2.20.0"  # the TensorFlow the image is built on (its release notes name it)
