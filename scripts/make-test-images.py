#!/usr/bin/env python3
"""Renders the small text images the runtime's end-to-end tests submit.

    /work/venv-ocr/bin/python scripts/make-test-images.py   # needs Pillow and DejaVu fonts

The outputs are committed (runtime/tests/data/), so tests need neither Python
nor fonts; rerun only to change them.
"""
from pathlib import Path
from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent.parent / "runtime" / "tests" / "data"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"

PAGES = {
    "invoice.png": ["Invoice 2026-11-27", "Total: 1,234.50 EUR", "Thank you for your order"],
    "hello.png": ["Hello OCR world"],
}


def render(lines, path):
    font = ImageFont.truetype(FONT, 30)
    width, line_height = 640, 56
    image = Image.new("RGB", (width, 40 + line_height * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(lines):
        draw.text((30, 24 + i * line_height), text, fill="black", font=font)
    image.save(path, optimize=True)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, lines in PAGES.items():
        render(lines, OUT / name)
        print(OUT / name)
