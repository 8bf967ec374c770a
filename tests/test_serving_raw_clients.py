"""Clients that send the original file, untouched: REST ``{"b64": ...}`` and bare TF Serving stubs.

Neither uses the project's client (which normalises images itself), so only
the exported graph's own decode (preprocessing/graph_decode.py) stands between
a phone's sideways JPEG or a transparent PNG and the model. Each answer must
agree with the same model's answer on the record the preprocessing job writes
for that file (``images.convert`` output), i.e. with what training saw.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import IMAGE_SIZE, export_tiny, start_server

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run

MODEL = "classifier"
# ImageOps.exif_transpose's method per orientation, and the method that undoes it (to store a file sideways).
_UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def raw_files(test_images: list[bytes]) -> dict[str, bytes]:
    """Original-file variants of test-split pictures (upscaled to 64x48 so orientation matters)."""
    pictures = [Image.open(io.BytesIO(data)).convert("RGB").resize((64, 48), Image.Resampling.BILINEAR)
                for data in test_images]
    files = {}
    for orientation in range(1, 9):
        upright = pictures[orientation % len(pictures)]
        stored = upright.transpose(_UNDO[orientation]) if orientation > 1 else upright
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"jpeg-orientation-{orientation}"] = _save(stored, "JPEG", quality=95, exif=exif.tobytes())
    alpha = Image.fromarray(np.tile(np.linspace(40, 255, 64), (48, 1)).astype(np.uint8), "L")
    rgba = pictures[1].copy()
    rgba.putalpha(alpha)
    files["png-rgba"] = _save(rgba, "PNG")
    gray16 = (np.asarray(pictures[2].convert("L"), dtype=np.uint16) * 257 + 100).astype(np.uint16)
    files["png-gray16"] = _save(Image.fromarray(gray16), "PNG")
    files["webp-lossy"] = _save(pictures[3], "WEBP", quality=90)
    files["webp-lossless-alpha"] = _save(rgba, "WEBP", lossless=True)
    return files


def png_bomb(side: int = 20000) -> bytes:
    """A 1-bit grayscale PNG of side x side zero pixels: tens of KB on disk, 1.2 GB as RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + side // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def raw_export(tiny_model, split_images, tmp_path_factory):
    model, labels = tiny_model
    base = tmp_path_factory.mktemp("raw-export")
    export_tiny(model, labels, base, split_images["test"])
    return base


@pytest.fixture(scope="module")
def raw_server(raw_export):
    server = start_server(raw_export)
    server.start()
    yield server
    server.stop(grace=5)


@pytest.fixture(scope="module")
def files(split_images) -> dict[str, bytes]:
    return raw_files(split_images["test"])


@pytest.fixture(scope="module")
def record_probabilities(raw_export, files) -> np.ndarray:
    """The export's answers on the records the job would write for ``files`` (what training saw)."""
    from preprocessing import images
    from trainer.publish.export import load_predict_fn

    records = [images.convert(raw, IMAGE_SIZE, "stretch", image_format="png").encoded for raw in files.values()]
    return load_predict_fn(str(raw_export / "1"))(records)["probabilities"]


def _rest(server, body: dict):
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL}:predict",
                                     data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def _instances(raws) -> dict:
    return {"instances": [{"b64": base64.b64encode(raw).decode("ascii")} for raw in raws]}


def _stub_predict(server, raws: list[bytes]):
    """A Predict call built only from tensorflow-serving-api stubs and tf.make_tensor_proto."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.model_spec.signature_name = "serving_default"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(raws, dtype=tf.string))
        response = stub.Predict(request, timeout=60)
        return tf.make_ndarray(response.outputs["probabilities"])


def _assert_close(got: np.ndarray, want: np.ndarray, names) -> None:
    for name, g, w in zip(names, got, want):
        assert int(np.argmax(g)) == int(np.argmax(w)), f"{name}: {g} vs record {w}"
        assert float(np.max(np.abs(g - w))) < 0.05, f"{name}: {g} vs record {w}"


def test_metadata_records_the_decode_and_the_limit(raw_export):
    from preprocessing.config import DEFAULT_MAX_PIXELS

    info = json.loads((raw_export / "1" / "assets.extra" / "metadata.json").read_text())["export"]
    assert info["decode"] == "upright-rgb-v1"
    assert info["max_pixels"] == DEFAULT_MAX_PIXELS


def test_rest_b64_original_files_match_the_records(raw_server, files, record_probabilities):
    status, body = _rest(raw_server, _instances(files.values()))
    assert status == 200, body
    got = np.array([prediction["probabilities"] for prediction in body["predictions"]], dtype=np.float32)
    _assert_close(got, record_probabilities, list(files))


def test_bare_stub_client_original_files_match_the_records(raw_server, files, record_probabilities):
    got = _stub_predict(raw_server, list(files.values()))
    _assert_close(got, record_probabilities, list(files))


def test_rest_bomb_is_refused_quickly_with_its_size(raw_server):
    bomb = png_bomb()
    assert len(bomb) < 200_000
    start = time.perf_counter()
    status, body = _rest(raw_server, _instances([bomb]))
    elapsed = time.perf_counter() - start
    assert status == 400, body
    assert body["error"].startswith("image too large (possible decompression bomb): 20000x20000 = 400,000,000 pixels")
    assert elapsed < 2.0


def test_stub_client_gets_the_decoders_reason(raw_server):
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        _stub_predict(raw_server, [b"this is not an image"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("Unknown image file format")
