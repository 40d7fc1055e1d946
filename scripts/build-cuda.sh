#!/usr/bin/env bash
# Builds with `--features cuda` on a machine without a GPU or a CUDA toolkit, using the CUDA
# build kit (../shared/cuda/setup.sh: nvcc 13.0 and headers from NVIDIA's PyPI wheels, candle
# patched to load libcuda/cuBLAS at run time). Extra arguments go to `cargo build`:
#
#   scripts/build-cuda.sh --release -p ocr-runtime --bin ocr-runtime
#   CARGO_SUBCOMMAND=check scripts/build-cuda.sh -p ocr-engine --lib --examples   # what CI runs
#
# CUDA_KIT overrides the kit folder. The kit's [patch] of candle rewrites Cargo.lock; the
# committed lock file is put back afterwards. The compiled candle kernels stay in the target
# directory, so only the first build pays for nvcc (about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDA_KIT:-}" ]; then
  for kit in "$(cd .. && pwd)/shared/cuda" /work/shared/cuda; do
    if [ -f "$kit/setup.sh" ]; then CUDA_KIT=$kit; break; fi
  done
fi
[ -n "${CUDA_KIT:-}" ] || { echo "build-cuda: no CUDA build kit (../shared/cuda); set CUDA_KIT" >&2; exit 1; }

# setup.sh copies candle from the registry cache, so the crates must be fetched first.
cargo fetch --locked >/dev/null
LOCK_BACKUP=$(mktemp)
cp Cargo.lock "$LOCK_BACKUP"
trap 'cp "$LOCK_BACKUP" Cargo.lock; rm -f "$LOCK_BACKUP"' EXIT
# In a function, so that the kit sees no positional arguments (its first is candle's version).
load_kit() {
  # shellcheck source=/dev/null
  source "$CUDA_KIT/setup.sh"
}
set +u
load_kit
set -u
# shellcheck disable=SC2086 # CANDLE_PATCH_ARGS is a list of arguments
cargo "${CARGO_SUBCOMMAND:-build}" --features cuda $CANDLE_PATCH_ARGS "$@"
