"""Does an export from this project's TensorFlow answer the same in TF Serving's TensorFlow?

``tensorflow/serving`` releases trail TensorFlow's by months, so the pinned
image (serving/config/README.md) runs an older TensorFlow than the trainer.
This script installs that TensorFlow in a throwaway venv, loads an export
there, runs ``serving_default`` on a set of raw uploads (every format and
colour mode the signature accepts, EXIF-rotated JPEGs, an oversized image
that must be refused), and compares each answer with the training venv's.

Run by hand (it downloads TensorFlow once, about 250 MB):

``python bench/serving_runtime.py [--export JOB/export/N] [--tensorflow 2.20.0] [--venv /tmp/tf-serving-runtime]``

Without ``--export`` it exports a tiny model first. Exit status 0 when every
answer agrees (class ids equal, probabilities within ``--tolerance``, the same
refusals), 1 otherwise. The table it prints goes into bench/RESULTS-serving.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serving import TF_SERVING_IMAGE, TF_SERVING_TENSORFLOW  # noqa: E402

# Run by both interpreters: plain TensorFlow, no project code (the throwaway venv has none).
RUNNER = r"""
import json, sys
import numpy as np
import tensorflow as tf
export, names, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
fn = tf.saved_model.load(export).signatures["serving_default"]
results = {"tensorflow": tf.__version__, "answers": {}}
for name, path in names.items():
    data = open(path, "rb").read()
    try:
        got = fn(image_bytes=tf.constant([data]))
        results["answers"][name] = {"probabilities": got["probabilities"].numpy()[0].tolist(),
                                    "class_id": int(got["class_ids"].numpy()[0])}
    except tf.errors.OpError as exc:
        results["answers"][name] = {"error": type(exc).__name__, "message": exc.message.splitlines()[0][:200]}
json.dump(results, open(out, "w"))
"""


def raw_uploads(size: int = 96) -> dict[str, bytes]:
    """One file per case a client may send: formats, colour modes, EXIF orientations, a decompression bomb."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:int(size * 1.5)]
    rgb = np.stack([xx * 255 // xx.max(), yy * 255 // yy.max(), (xx + yy) * 255 // (xx + yy).max()], -1)
    rgb[size // 4:size // 2, size // 4:size // 2] = (220, 30, 30)  # an off-centre block: orientation shows
    base = Image.fromarray(rgb.astype(np.uint8), "RGB")

    def save(image, fmt, **kwargs) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    cases = {}
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        cases[f"jpeg-exif-{orientation}"] = save(base, "JPEG", quality=95, exif=exif.tobytes())
    alpha = base.copy()
    alpha.putalpha(Image.fromarray((np.arange(base.width)[None, :].repeat(size, 0) * 255 // base.width)
                                   .astype(np.uint8), "L"))
    cases["png-rgba"] = save(alpha, "PNG")
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cases["png-palette-transparent"] = save(palette, "PNG", transparency=0)
    cases["png-grayscale"] = save(base.convert("L"), "PNG")
    cases["png-16bit"] = save(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), "PNG")
    cases["jpeg-cmyk"] = save(base.convert("CMYK"), "JPEG", quality=95)
    cases["webp-lossy"] = save(base, "WEBP", quality=90)
    cases["webp-lossless-alpha"] = save(alpha, "WEBP", lossless=True)
    cases["gif"] = save(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF")
    cases["bmp"] = save(base, "BMP")
    # 20,000 x 20,000 1-bit grayscale: a few tens of KB that would decode to 1.2 GB of RGB.
    width = height = 20000
    row = b"\x00" + b"\x00" * (width // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    cases["png-bomb-20000x20000"] = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return cases


def _ensure_venv(venv: str, version: str) -> str:
    python = os.path.join(venv, "bin", "python")
    probe = subprocess.run([python, "-c", "import tensorflow as tf; print(tf.__version__)"],
                           capture_output=True, text=True) if os.path.exists(python) else None
    if probe is None or probe.returncode != 0 or probe.stdout.strip() != version:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", f"tensorflow-cpu=={version}"], check=True)
    return python


def _run(python: str, export: str, files: dict[str, str], workdir: str, tag: str) -> dict:
    out = os.path.join(workdir, f"{tag}.json")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([python, "-c", RUNNER, export, json.dumps(files), out], capture_output=True, text=True,
                          env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{tag}: the runner failed:\n{done.stderr[-2000:]}")
    with open(out) as handle:
        return json.load(handle)


def _tiny_export(workdir: str) -> str:
    from bench.bench_serving import _build_export, _images

    path, _ = _build_export("tiny", os.path.join(workdir, "export"), _images(32, 8))
    return path


def compare(ours: dict, theirs: dict, tolerance: float) -> tuple[list[dict], bool]:
    import numpy as np

    rows, ok = [], True
    for name, mine in ours["answers"].items():
        other = theirs["answers"][name]
        if "error" in mine or "error" in other:
            same = mine.get("error") == other.get("error")
            row = {"case": name, "ours": mine.get("error", "answer"), "theirs": other.get("error", "answer"),
                   "max_abs_diff": "", "agree": same}
        else:
            diff = float(np.max(np.abs(np.array(mine["probabilities"]) - np.array(other["probabilities"]))))
            same = mine["class_id"] == other["class_id"] and diff <= tolerance
            row = {"case": name, "ours": f"class {mine['class_id']} ({max(mine['probabilities']):.6f})",
                   "theirs": f"class {other['class_id']} ({max(other['probabilities']):.6f})",
                   "max_abs_diff": f"{diff:.2g}", "agree": same}
        ok &= same
        rows.append(row)
    return rows, ok


def render(rows: list[dict], ours: dict, theirs: dict, export: str) -> str:
    lines = [f"Export `{export}`; training venv TensorFlow {ours['tensorflow']}, "
             f"serving runtime TensorFlow {theirs['tensorflow']}.", "",
             f"| case | TF {ours['tensorflow']} | TF {theirs['tensorflow']} | max abs diff | agree |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['ours']} | {r['theirs']} | {r['max_abs_diff']} | {'yes' if r['agree'] else 'NO'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/serving_runtime.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="an export version folder (default: export a tiny model)")
    parser.add_argument("--tensorflow", default=TF_SERVING_TENSORFLOW,
                        help=f"TensorFlow of the serving image {TF_SERVING_IMAGE} (default %(default)s)")
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "tf-serving-runtime"),
                        help="the throwaway venv, reused when it already holds that TensorFlow (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max abs diff of probabilities (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        export = args.export or _tiny_export(workdir)
        files = {}
        for name, data in raw_uploads().items():
            files[name] = os.path.join(workdir, name)
            with open(files[name], "wb") as handle:
                handle.write(data)
        theirs = _run(_ensure_venv(args.venv, args.tensorflow), export, files, workdir, "theirs")
        ours = _run(sys.executable, export, files, workdir, "ours")
        rows, ok = compare(ours, theirs, args.tolerance)
        print(render(rows, ours, theirs, args.export or "a tiny model exported by this script"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
