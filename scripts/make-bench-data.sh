#!/usr/bin/env bash
# Generates the synthetic OCR benchmark (/work/shared/ocr-bench/gen_bench.py, default seed 1234)
# that runtime/engine/tests/accuracy.rs measures the engine on.
#
#   scripts/make-bench-data.sh     # into ${OCR_BENCH_DATA:-${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}/ocr-bench-data}
#
# Idempotent: does nothing when the data set is complete. Otherwise it installs what it needs:
#   - the Debian font packages gen_bench.py renders with (apt-get; needs root),
#   - a Python venv with pinned Pillow/NumPy in $OCR_TOOLS_DIR/venv-bench-data,
# then renders into a temporary folder and moves it into place, so an interrupted run never
# leaves a half-written set behind.
#
# OCR_BENCH_GEN overrides the generator (default /work/shared/ocr-bench/gen_bench.py).
set -euo pipefail

TOOLS=${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}
OUT=${OCR_BENCH_DATA:-$TOOLS/ocr-bench-data}
GEN=${OCR_BENCH_GEN:-/work/shared/ocr-bench/gen_bench.py}
VENV=$TOOLS/venv-bench-data
PYTHON=${PYTHON:-python3}
SEED=1234
# Rendering depends on the Pillow version; the text on the Python version (stdlib docstrings).
PIP_PINS=("pillow==12.3.0" "numpy==2.4.6")
FONT_PACKAGES=(fonts-nanum fonts-dejavu-core fonts-dejavu-extra fonts-liberation2
  fonts-freefont-ttf fonts-urw-base35 fonts-roboto)

complete() {
  [ -f "$OUT/.complete" ] &&
    [ "$(ls "$OUT"/lines_en/*.png 2>/dev/null | wc -l)" -eq 300 ] &&
    [ "$(ls "$OUT"/docs/*.png 2>/dev/null | wc -l)" -eq 20 ] &&
    [ -s "$OUT/lines_en/gt.tsv" ] && [ -s "$OUT/docs/gt.jsonl" ]
}

if complete; then
  echo "make-bench-data: data present in $OUT"
  exit 0
fi

if [ ! -f "$GEN" ]; then
  echo "make-bench-data: generator $GEN not found (set OCR_BENCH_GEN)" >&2
  exit 1
fi

missing_pkgs=()
for p in "${FONT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_pkgs+=("$p")
done
if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  echo "make-bench-data: installing ${missing_pkgs[*]}"
  SUDO=()
  [ "$(id -u)" = 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing_pkgs[@]}"
fi

if ! "$VENV/bin/python" -c 'import PIL, numpy' >/dev/null 2>&1; then
  echo "make-bench-data: creating $VENV (${PIP_PINS[*]})"
  mkdir -p "$TOOLS"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PIP_PINS[@]}"
fi

mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d "$(dirname "$OUT")/.ocr-bench-data.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "make-bench-data: rendering into $OUT (seed $SEED)"
"$VENV/bin/python" "$GEN" --out "$TMP" --seed "$SEED"
{
  echo "generator=$GEN"
  echo "seed=$SEED"
  echo "python=$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
  "$VENV/bin/python" -c 'import PIL, numpy; print(f"pillow={PIL.__version__}\nnumpy={numpy.__version__}")'
} >"$TMP/.complete"
rm -rf "$OUT"
mv "$TMP" "$OUT"
trap - EXIT
echo "make-bench-data: done"
