#!/usr/bin/env bash
# The GPU device check, in two halves.
#
#   scripts/gpu-check.sh bundle   # here, no GPU needed: builds the CUDA binaries and packs them,
#                                 # the PP-OCRv6 small weights and the benchmark pages into .gpu/
#   scripts/gpu-check.sh run      # on the GPU machine, from the repository root: unpacks .gpu/,
#                                 # runs the engine check and the worker benchmark, samples
#                                 # nvidia-smi, writes everything to ${OUT:-gpu-check-out}/
#
# `bundle` needs the CUDA build kit (../shared/cuda/setup.sh), the weights
# (scripts/fetch-models.sh) and the benchmark data (scripts/make-bench-data.sh). The GPU machine
# needs nothing but the NVIDIA driver and the CUDA 13 libraries (cuBLAS): the binaries dlopen
# them. .gpu/ is meant to be git-ignored (add it to .git/info/exclude) and carried.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.gpu

bundle() {
  local models=${OCR_MODEL_DIR:-$HOME/.cache/ocr-models}
  local bench=${OCR_BENCH_DATA:-${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}/ocr-bench-data}
  export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-target}-cuda}
  scripts/build-cuda.sh --release -p ocr-engine --example gpu_check
  scripts/build-cuda.sh --release -p ocr-runtime --bench worker_modes
  local worker_bin
  worker_bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/worker_modes-* 2>/dev/null | grep -v '\.d$' | head -n1)
  [ -x "$worker_bin" ] || { echo "gpu-check: worker_modes did not build" >&2; exit 1; }
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin" "$BUNDLE/models" "$BUNDLE/bench/docs"
  cp "$CARGO_TARGET_DIR/release/examples/gpu_check" "$worker_bin" "$BUNDLE/bin/"
  mv "$BUNDLE/bin/$(basename "$worker_bin")" "$BUNDLE/bin/worker_modes"
  strip "$BUNDLE"/bin/*
  tar -C "$BUNDLE" -cJf "$BUNDLE/bin.tar.xz" bin && rm -rf "$BUNDLE/bin"
  cp "$models"/ppocrv6_small_det.onnx "$models"/ppocrv6_small_rec.onnx "$BUNDLE/models/"
  python3 - "$bench/docs" "$BUNDLE/bench/docs" <<'PY'
import json, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
with open(f"{src}/gt.jsonl") as f, open(f"{dst}/gt.jsonl", "w") as out:
    for line in f:
        page = json.loads(line)
        if page["lang"] == "en":
            out.write(line)
            shutil.copy(f"{src}/{page['file']}", dst)
PY
  du -sh "$BUNDLE"
}

run() {
  local out=${OUT:-gpu-check-out} work=/tmp/gpu-check
  mkdir -p "$out" "$work"
  tar -C "$work" -xJf "$BUNDLE/bin.tar.xz"
  # The CUDA 13 libraries ship with PyTorch's NVIDIA wheels (and /usr/local/cuda-13.0).
  local libdirs
  libdirs=$(python3 - 2>/dev/null <<'PY' || true
import glob, os, nvidia
dirs = []
for r in nvidia.__path__:
    dirs += glob.glob(os.path.join(r, 'cu13', 'lib')) + sorted(glob.glob(os.path.join(r, '*', 'lib')))
print(':'.join(dict.fromkeys(d for d in dirs if glob.glob(d + '/lib*.so*'))))
PY
)
  local extra
  extra=$(find /usr/local /usr/lib /opt -maxdepth 8 -name 'libcublas.so.13' 2>/dev/null |
    xargs -r -n1 dirname | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="${libdirs}:${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 100 >"$out/smi.csv" 2>/dev/null &
  SMI_PID=$!
  trap 'kill $SMI_PID 2>/dev/null || true' EXIT
  export OCR_MODEL_DIR=$PWD/$BUNDLE/models
  echo "== engine check" | tee "$out/gpu_check.log"
  timeout "${GPU_CHECK_TIMEOUT:-300}" "$work/bin/gpu_check" "$OCR_MODEL_DIR" "$PWD/$BUNDLE/bench" 2>&1 |
    tee -a "$out/gpu_check.log" || echo "gpu_check exited with $?" | tee -a "$out/gpu_check.log"
  for precision in ${WORKER_PRECISIONS:-f16}; do
    echo "== worker, $precision" | tee -a "$out/worker.log"
    OCR_BENCH_DATABASE=sqlite OCR_BENCH_DEVICE=cuda OCR_BENCH_PRECISION=$precision \
      timeout "${WORKER_TIMEOUT:-200}" "$work/bin/worker_modes" ${WORKER_ARGS:-256 8,32,64} 2>&1 |
      tee -a "$out/worker.log" || echo "worker_modes exited with $?" | tee -a "$out/worker.log"
  done
  kill "$SMI_PID" 2>/dev/null || true
  # Mean GPU utilisation within each run's window (the worker prints `window LABEL START END`).
  python3 - "$out/worker.log" "$out/smi.csv" <<'PY' | tee "$out/utilisation.txt"
import sys, datetime
windows = [l.split() for l in open(sys.argv[1]) if l.startswith("window ")]
# What the worker itself exported (ocr_gpu_utilization_ratio from NVML, 0..1, a mean of the
# last 15 one-second samples) at the end of each run.
nvml = {p[1]: p[2] for p in (l.split() for l in open(sys.argv[1]) if l.startswith("nvml "))}
samples = []
for line in open(sys.argv[2]):
    parts = [p.strip() for p in line.split(",")]
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp() * 1000
        samples.append((t, float(parts[1]), float(parts[2])))
    except (ValueError, IndexError):
        pass
print("GPU utilisation per worker run (nvidia-smi every 100 ms, and the worker's own ocr_gpu_utilization_ratio):")
for _, label, start, end in windows:
    inside = [s for s in samples if float(start) <= s[0] <= float(end)]
    if inside:
        util = sum(s[1] for s in inside) / len(inside)
        mem = max(s[2] for s in inside)
        try:
            exported = f"{100 * float(nvml.get(label, 'nan')):5.1f} %"
        except ValueError:
            exported = "none"
        print(f"  {label:<32} {util:5.1f} %  ({len(inside)} samples, peak {mem:.0f} MiB)  worker's NVML gauge: {exported}")
    else:
        print(f"  {label:<32} no samples")
PY
}

case "${1:-}" in
  bundle) bundle ;;
  run) run ;;
  *) echo "usage: $0 bundle|run" >&2; exit 2 ;;
esac
