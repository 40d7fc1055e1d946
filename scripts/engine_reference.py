#!/usr/bin/env python3
"""Reference outputs of rapidocr 3.10 for the Rust engine's tests (runtime/engine/tests/data/).

Writes:
  page_en.png              a rendered 768x736 page (DejaVu fonts, one line rotated by 8 degrees)
  page_en_det_map.png      the PP-OCRv6-small detector's probability map for it, quantised to 8 bits
  page_en_expected.json    {"db": rapidocr's DB post-processing of the *quantised* map
                                   (boxes in page pixels, reading order, scores),
                            "ocr": the full rapidocr pipeline on the page (use_cls=False):
                                   boxes, texts, scores}

The Rust test `tests/reference.rs` runs its DB post-processing on the same quantised map, so the
comparison does not depend on the Candle port of the network. The "ocr" part is compared only
when real models are installed (see that test).

Run with the venv that has rapidocr==3.10.0 (Pillow, numpy, onnxruntime):
  /work/venv-ocr/bin/python scripts/engine_reference.py runtime/engine/tests/data
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import rapidocr
from rapidocr import RapidOCR
from rapidocr.ch_ppocr_det.main import TextDetector
from rapidocr.ch_ppocr_det.utils import DBPostProcess, DetPreProcess

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
LINES = [
    ("DejaVuSans.ttf", 28, (40, 40), "Invoice 2026-11-27 No. 48213", 0),
    ("DejaVuSerif.ttf", 22, (40, 110), "Total due: $1,234.56 (VAT incl.)", 0),
    ("DejaVuSansMono.ttf", 18, (40, 170), "contact: billing@example.com", 0),
    ("DejaVuSans-Bold.ttf", 34, (600, 36), "PAID", 0),
    ("DejaVuSans.ttf", 24, (60, 300), "The quick brown fox jumps", 8),
    ("DejaVuSerif.ttf", 16, (40, 470), "Small print: terms apply within 30 days.", 0),
    ("DejaVuSans.ttf", 26, (40, 560), "Left column", 0),
    ("DejaVuSans.ttf", 26, (430, 566), "Right column", 0),
]


def render() -> Image.Image:
    page = Image.new("RGB", (768, 736), "white")
    for font_name, size, (x, y), text, angle in LINES:
        font = ImageFont.truetype(str(FONT_DIR / font_name), size)
        if angle == 0:
            ImageDraw.Draw(page).text((x, y), text, fill=(20, 20, 20), font=font)
            continue
        left, top, right, bottom = font.getbbox(text)
        tile = Image.new("L", (right + 20, bottom + 20), 0)
        ImageDraw.Draw(tile).text((10, 10), text, fill=255, font=font)
        tile = tile.rotate(angle, expand=True, resample=Image.BICUBIC)
        ink = Image.new("RGB", tile.size, (20, 20, 20))
        page.paste(ink, (x, y), tile)
    return page


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    page = render()
    page.save(out_dir / "page_en.png", optimize=True)
    bgr = np.array(page)[:, :, ::-1].copy()

    models = Path(rapidocr.__file__).parent / "models"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(models / "PP-OCRv6_det_small.onnx"), providers=["CPUExecutionProvider"])
    x = DetPreProcess(736, "min", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(bgr)
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    q = np.clip(np.round(pred[0, 0] * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(q, mode="L").save(out_dir / "page_en_det_map.png", optimize=True)

    post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                         score_mode="fast", use_dilation=True)
    deq = (q.astype(np.float32) / 255.0)[None, None]
    boxes, scores = post(deq, bgr.shape[:2])
    boxes = TextDetector.sorted_boxes(boxes) if len(boxes) else boxes
    # sorted_boxes reorders boxes only; recompute the matching scores by identity.
    order = []
    raw_boxes, raw_scores = post(deq, bgr.shape[:2])
    for b in boxes:
        for i, rb in enumerate(raw_boxes):
            if i not in order and np.array_equal(rb, b):
                order.append(i)
                break
    db = {
        "map_width": int(q.shape[1]),
        "map_height": int(q.shape[0]),
        "dest_width": int(bgr.shape[1]),
        "dest_height": int(bgr.shape[0]),
        "boxes": [b.tolist() for b in boxes],
        "scores": [float(raw_scores[i]) for i in order],
    }

    engine = RapidOCR(params={"Global.log_level": "error", "Global.use_cls": False})
    res = engine(bgr, use_det=True, use_cls=False, use_rec=True)
    ocr = {
        "boxes": [np.asarray(b).tolist() for b in (res.boxes if res.boxes is not None else [])],
        "texts": list(res.txts or []),
        "scores": [float(s) for s in (res.scores or [])],
    }
    with open(out_dir / "page_en_expected.json", "w") as f:
        json.dump({"db": db, "ocr": ocr}, f, indent=1, ensure_ascii=False)
    print(json.dumps(ocr, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runtime/engine/tests/data"))
