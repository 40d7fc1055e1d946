#!/usr/bin/env python3
"""Generate onnxruntime reference outputs for the engine's parity tests.

The tests in runtime/engine/tests/parity.rs run the native candle networks on the inputs
written here and compare against the outputs onnxruntime produced from the same ONNX files.

Usage (from the repository root, weights fetched by scripts/fetch-models.sh):

    python3 -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install numpy pillow onnxruntime
    /tmp/venv-ref/bin/python scripts/make-engine-reference.py [--models DIR] [--out DIR] \
        [--tags v6_small,v6_tiny,v5_mobile] [--keep-inputs]

--tags limits which models get new references; --keep-inputs reuses the stored inputs.npz
instead of rendering it again, so adding a model leaves the other references valid.

Inputs are rendered text images (deterministic apart from the font Pillow ships, which only
matters when regenerating: the tests read the stored inputs, not the renderer). They are stored
as float16 and upcast to float32 before both onnxruntime and candle see them, so both sides get
bit-identical float32 input.

Files (uncompressed .npz, since candle's npz reader has no deflate support):
  inputs.npz   det [1,3,128,160] f16, rec [2,3,48,160] f16
and for TAG in v6_small, v6_tiny, v5_mobile:
  det_TAG.npz  prob [1,1,128,160] f32
  rec_TAG.npz  the softmax output in sparse form:
                    every entry >= SPARSE_MIN as coords [K,3] (n, t, class) int32 and values [K]
                    f32, and the output shape. Entries below SPARSE_MIN are near zero; the test
                    bounds them by checking candle's value there is small too (see parity.rs).
                    The dense output ([2,20,18710] f32, 3 MB) would be too big to commit.
The v6 small and v5 mobile recognisers embed their character list in the ONNX metadata.
The v6 tiny recogniser has no embedded dictionary; ppocrv6_tiny_dict.txt from the model dir
is used only to print the decoded text.
"""

import argparse
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

SPARSE_MIN = 1e-4
TAGS = ["v6_small", "v6_tiny", "v5_mobile"]


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render(width, height, lines, seed, size):
    """Dark text on a light, slightly noisy background, as an HxWx3 uint8 array."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (235, 232, 225))
    draw = ImageDraw.Draw(img)
    f = font(size)
    for (x, y, text) in lines:
        draw.text((x, y), text, fill=(20, 20, 30), font=f)
    arr = np.asarray(img).astype(np.int16)
    arr += rng.integers(-12, 13, size=arr.shape, dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def normalize(img):
    """PP-OCRv6 preprocessing for both det and rec: (x / 255 - 0.5) / 0.5, HWC -> CHW."""
    x = img.astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return x.transpose(2, 0, 1)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, x32):
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x32})[0]


def main():
    default_models = os.environ.get("OCR_MODEL_DIR", str(Path.home() / ".cache" / "ocr-models"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=default_models)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "runtime/engine/tests/data"))
    ap.add_argument("--tags", default=",".join(TAGS), help="comma-separated subset of " + ", ".join(TAGS))
    ap.add_argument("--keep-inputs", action="store_true", help="reuse OUT/inputs.npz instead of rendering it")
    args = ap.parse_args()
    tags = [t for t in args.tags.split(",") if t]
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        ap.error(f"unknown tags {unknown}")
    models = Path(args.models)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.keep_inputs:
        stored = np.load(out / "inputs.npz")
        det_in, rec_in = stored["det"], stored["rec"]
    else:
        # Detector: a small page with a few lines of text.
        page = render(160, 128, [(8, 10, "PP-OCRv6 det"), (8, 46, "Hello, world 42"), (20, 86, "candle")], seed=1, size=18)
        det_in = normalize(page)[None].astype(np.float16)
        # Recogniser: two text lines, batched.
        lines = [render(160, 48, [(4, 10, "Parity 2025")], seed=2, size=26),
                 render(160, 48, [(6, 8, "hello candle")], seed=3, size=24)]
        rec_in = np.stack([normalize(l) for l in lines]).astype(np.float16)
        np.savez(out / "inputs.npz", det=det_in, rec=rec_in)

    for tag in tags:
        det_prob = run(session(models / f"ppocr{tag[:2]}_{tag[3:]}_det.onnx"), det_in.astype(np.float32))
        assert det_prob.shape == (1, 1, 128, 160), det_prob.shape
        np.savez(out / f"det_{tag}.npz", prob=np.ascontiguousarray(det_prob, dtype=np.float32))
        print(f"det {tag}: prob range", float(det_prob.min()), float(det_prob.max()))

        sess = session(models / f"ppocr{tag[:2]}_{tag[3:]}_rec.onnx")
        rec_out = run(sess, rec_in.astype(np.float32))
        coords = np.ascontiguousarray(np.argwhere(rec_out >= SPARSE_MIN), dtype=np.int32)
        values = rec_out[rec_out >= SPARSE_MIN].astype(np.float32)
        np.savez(out / f"rec_{tag}.npz", coords=coords, values=values,
                 shape=np.array(rec_out.shape, dtype=np.int32))
        meta = sess.get_modelmeta().custom_metadata_map
        if "character" in meta:
            chars = meta["character"].splitlines()
        else:
            with open(models / f"ppocr{tag[:2]}_{tag[3:]}_dict.txt", "rb") as f:
                chars = [l.decode("utf-8").strip("\n").strip("\r\n") for l in f.readlines()]
        table = ["<blank>"] + chars + [" "]
        assert len(table) == rec_out.shape[2], (len(table), rec_out.shape)
        for n in range(rec_out.shape[0]):
            ids = rec_out[n].argmax(-1)
            text = "".join(table[i] for j, i in enumerate(ids) if i != 0 and (j == 0 or ids[j - 1] != i))
            print(f"rec {tag}[{n}]: {text!r}, output {rec_out.shape}, {len(values)} sparse entries")


if __name__ == "__main__":
    main()
