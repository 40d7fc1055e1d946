#!/usr/bin/env bash
# Unpacks Debian's Prometheus (server and promtool) outside the clone, for the tests that query
# a real Prometheus (the advisor's Prometheus source) and for `promtool check rules` on the
# chart's PrometheusRule. `apt-get download` + `dpkg -x`: nothing is installed system-wide and no
# service starts; the binaries are static Go programs.
#
#   scripts/install-prometheus.sh     # prints the folder holding `prometheus` and `promtool`
#
# Idempotent: nothing is fetched when it is already unpacked. Not pinned to a Debian revision:
# the mirror keeps only the current one (bookworm has 2.42 with security fixes).
set -euo pipefail

TOOLS=${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}
ROOT="$TOOLS/prometheus-debian"
BIN="$ROOT/usr/bin"

if [ ! -x "$BIN/prometheus" ] || [ ! -x "$BIN/promtool" ]; then
  echo "install-prometheus: fetching Debian's prometheus into $ROOT" >&2
  download=$(mktemp -d)
  trap 'rm -rf "$download"' EXIT
  # _apt cannot write into a private temporary folder: fetch it as the caller.
  (cd "$download" && apt-get download -q -o APT::Sandbox::User="$(id -un)" prometheus >&2) || {
    echo "install-prometheus: apt-get download failed; is Debian's package index reachable (apt-get update)?" >&2
    exit 1
  }
  mkdir -p "$ROOT.partial"
  dpkg -x "$download"/prometheus_*.deb "$ROOT.partial"
  rm -rf "$ROOT" && mv "$ROOT.partial" "$ROOT"
fi
"$BIN/prometheus" --version >/dev/null
echo "$BIN"
