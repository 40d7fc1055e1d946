#!/usr/bin/env bash
# Installs the Kafka-compatible Tansu broker (crates.io, Apache-2.0) outside the clone, for the
# tests that need a real broker process (CreateTopics, which librdkafka's mock cluster lacks).
#
#   scripts/install-tansu.sh        # prints the binary's path
#
# Idempotent: nothing is built when the pinned version is already installed. Where the
# workplace ships the prebuilt binary (../shared/tansu beside the clone, or OCR_TANSU_PREBUILT),
# it is unpacked and checked against its SHA-256 instead of built; otherwise the build takes
# about 10 minutes on 2 cores, and its target directory is kept next to the binary so a
# version bump rebuilds incrementally.
set -euo pipefail

VERSION=0.6.0
TOOLS=${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}
ROOT="$TOOLS/tansu-$VERSION"
BIN="$ROOT/bin/tansu"

PREBUILT=${OCR_TANSU_PREBUILT:-$(cd "$(dirname "$0")/.." && pwd)/../shared/tansu}
[ -d "$PREBUILT" ] || PREBUILT=/work/shared/tansu  # a clone elsewhere on a workplace machine
if [ ! -x "$BIN" ] && [ -f "$PREBUILT/tansu-$VERSION.gz" ] && [ -f "$PREBUILT/SHA256SUMS" ]; then
  echo "install-tansu: unpacking the prebuilt tansu $VERSION from $PREBUILT" >&2
  mkdir -p "$ROOT/bin"
  gzip -dc "$PREBUILT/tansu-$VERSION.gz" >"$BIN.partial"
  if echo "$(cut -d' ' -f1 "$PREBUILT/SHA256SUMS")  $BIN.partial" | sha256sum --check --status; then
    chmod +x "$BIN.partial" && mv "$BIN.partial" "$BIN"
  else
    echo "install-tansu: the prebuilt binary does not match its SHA-256; building instead" >&2
    rm -f "$BIN.partial"
  fi
fi
if [ ! -x "$BIN" ]; then
  echo "install-tansu: building tansu $VERSION into $ROOT (about 10 minutes)" >&2
  cargo install tansu --version "=$VERSION" --locked --no-default-features \
    --features dynostore,libsql --root "$ROOT" --target-dir "$TOOLS/target-tansu" >&2
fi
echo "$BIN"
