"""gRPC client for an image classifier behind TF Serving (or the development server).

Library::

    from serving.client import PredictionClient
    with PredictionClient("127.0.0.1:8500", "classifier") as client:
        client.wait_until_ready(timeout=60)
        for p in client.predict(["cat.jpg", open("dog.png", "rb").read()]):
            print(p.source, p.label, p.score, p.top(3))
        client.metadata()   # signatures, read from GetModelMetadata
        client.status()     # version states, from GetModelStatus

This module is the client's public face: import from here. The code lives in
modules with one job each, which import one way and never this module:

* :mod:`serving.grpc_client` - :class:`PredictionClient`, the gRPC calls
  (signature discovery from metadata, batching, retries with backoff);
* :mod:`serving.client_types` - what it returns and its options
  (:class:`Prediction`, :class:`ClientOptions`, :class:`ServingClientError`...);
* :mod:`serving.images` - which files are images, and what bytes are sent
  (:func:`to_decodable`, the ``--normalize-on-client`` clean-up);
* :mod:`serving.client_cli` - the CLI, ``python -m serving.client --server
  HOST:PORT --model NAME IMAGES_OR_FOLDERS...`` (``metadata`` and ``status``
  subcommands; ``--help`` for the rest), also the console script
  ``tlp-client`` (``serving.client:main``).

Importing this module loads neither gRPC nor TensorFlow: they are imported
when a client is made, never for ``--help``.
"""

from __future__ import annotations

import sys

from serving.client_cli import COMMANDS, build_parser, main
from serving.client_types import (DEFAULT_MAX_MESSAGE_BYTES, ClientOptions, ModelMetadata, Prediction,
                                  ServingClientError, Signature, TensorInfo, VersionStatus)
from serving.grpc_client import RETRYABLE, PredictionClient
from serving.images import IMAGE_EXTENSIONS, ImageInput, expand_images, read_image, to_decodable

__all__ = ["COMMANDS", "DEFAULT_MAX_MESSAGE_BYTES", "IMAGE_EXTENSIONS", "RETRYABLE", "ClientOptions", "ImageInput",
           "ModelMetadata", "Prediction", "PredictionClient", "ServingClientError", "Signature", "TensorInfo",
           "VersionStatus", "build_parser", "expand_images", "main", "read_image", "to_decodable"]

if __name__ == "__main__":
    sys.exit(main())
