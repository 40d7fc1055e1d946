#!/usr/bin/env python3
"""Pages/s of the onnxruntime reference (rapidocr 3.10, PP-OCRv6 small) on a list of images.

  python3 scripts/bench-onnxruntime.py --threads 1 PAGE.png...

Prints one JSON object: engine, threads, pages, lines, seconds, pages_per_s, cpu_seconds.
The first page is run once before timing (session warm-up) and then timed with the rest.
The weights are the files the Rust engine loads ($OCR_MODEL_DIR, default ~/.cache/ocr-models,
see scripts/fetch-models.sh), so both sides run the same networks.

Run by runtime/engine/benches/cpu_vs_onnxruntime.rs. On first use it creates a venv outside
the repository, $OCR_TOOLS_DIR/venv-rapidocr (default ~/.cache/ocr-serving/venv-rapidocr),
with the pinned packages below, and re-executes itself there.
"""
import argparse
import json
import os
import subprocess
import sys
import time

PINS = ["rapidocr==3.10.0", "onnxruntime==1.32.0", "numpy==2.4.6", "pillow==12.3.0",
        "opencv-python-headless==5.0.0.93"]
TOOLS = os.environ.get("OCR_TOOLS_DIR") or os.path.expanduser("~/.cache/ocr-serving")
VENV = os.path.join(TOOLS, "venv-rapidocr")


def ensure_venv():
    try:
        import rapidocr  # noqa: F401
        import onnxruntime  # noqa: F401
        return
    except ImportError:
        pass
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        sys.exit(f"bench-onnxruntime: {VENV} lacks rapidocr/onnxruntime; delete it and rerun")
    if not os.path.exists(py):
        print(f"bench-onnxruntime: creating {VENV} ({' '.join(PINS)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    ok = subprocess.run([py, "-c", "import rapidocr, onnxruntime"], capture_output=True).returncode == 0
    if not ok:
        subprocess.run([py, "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True, help="onnxruntime intra-op threads")
    ap.add_argument("--model-dir", default=os.environ.get("OCR_MODEL_DIR") or os.path.expanduser("~/.cache/ocr-models"))
    ap.add_argument("pages", nargs="+")
    a = ap.parse_args()

    # Keep OpenCV's and OpenMP's own pools to the same thread count as onnxruntime's.
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    ensure_venv()
    import cv2
    from rapidocr import RapidOCR

    cv2.setNumThreads(a.threads)
    eng = RapidOCR(params={
        "Global.log_level": "error",
        "Global.use_cls": False,
        "Det.model_path": os.path.join(a.model_dir, "ppocrv6_small_det.onnx"),
        "Rec.model_path": os.path.join(a.model_dir, "ppocrv6_small_rec.onnx"),
        "EngineConfig.onnxruntime.intra_op_num_threads": a.threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
    })

    def run(path):
        r = eng(cv2.imread(path), use_det=True, use_cls=False, use_rec=True)
        return 0 if r.boxes is None else len(r.txts)

    run(a.pages[0])  # warm-up: session initialisation and first allocations
    lines = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for p in a.pages:
        lines += run(p)
    dt = time.perf_counter() - t0
    dc = time.process_time() - c0
    print(json.dumps({
        "engine": "rapidocr 3.10 / onnxruntime " + __import__("onnxruntime").__version__,
        "threads": a.threads, "pages": len(a.pages), "lines": lines,
        "seconds": round(dt, 3), "pages_per_s": round(len(a.pages) / dt, 4), "cpu_seconds": round(dc, 3),
    }))


if __name__ == "__main__":
    main()
