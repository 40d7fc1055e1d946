#!/usr/bin/env bash
# Installs the Kafka-compatible Tansu broker (crates.io, Apache-2.0) outside the clone, for the
# tests that need a real broker process (CreateTopics, which librdkafka's mock cluster lacks).
#
#   scripts/install-tansu.sh        # prints the binary's path
#
# Idempotent: nothing is built when the pinned version is already installed. The first build
# takes about 10 minutes on 2 cores; its target directory is kept next to the binary so a
# version bump rebuilds incrementally.
set -euo pipefail

VERSION=0.6.0
TOOLS=${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}
ROOT="$TOOLS/tansu-$VERSION"
BIN="$ROOT/bin/tansu"

if [ ! -x "$BIN" ]; then
  echo "install-tansu: building tansu $VERSION into $ROOT (about 10 minutes)" >&2
  cargo install tansu --version "=$VERSION" --locked --no-default-features \
    --features dynostore,libsql --root "$ROOT" --target-dir "$TOOLS/target-tansu" >&2
fi
echo "$BIN"
