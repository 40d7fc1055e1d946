#!/usr/bin/env bash
# Runs the whole test suite on this machine against real services:
# MariaDB (127.0.0.1:3306, root, no password) and the PP-OCR weights.
# Starts MariaDB if it is installed but stopped, fetches the weights if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

mysql_up() { mysqladmin --host=127.0.0.1 --user=root ping >/dev/null 2>&1; }
if ! mysql_up; then
  if [ -x /usr/sbin/mariadbd ]; then
    echo "test: starting MariaDB"
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    for _ in $(seq 1 30); do mysql_up && break; sleep 1; done
  fi
  mysql_up || { echo "test: MariaDB is not reachable at 127.0.0.1:3306 (set OCR_TEST_MYSQL_URL)"; exit 1; }
fi

scripts/fetch-models.sh
scripts/make-bench-data.sh  # synthetic OCR benchmark for runtime/engine/tests/accuracy.rs

# moto's S3 server stands in for S3/MinIO in the blob-store test.
TOOLS=${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}
if [ ! -x "$TOOLS/venv-moto/bin/moto_server" ]; then
  echo "test: installing moto (S3 test server) into $TOOLS/venv-moto"
  python3 -m venv "$TOOLS/venv-moto"
  "$TOOLS/venv-moto/bin/pip" install -q 'moto[server]==5.2.5'
fi
export OCR_TEST_MOTO_SERVER="$TOOLS/venv-moto/bin/moto_server"

# Tansu, a Kafka-compatible broker, for what the in-process mock cluster cannot do (CreateTopics).
OCR_TEST_TANSU=$(scripts/install-tansu.sh)
export OCR_TEST_TANSU

# A real Prometheus for the advisor's Prometheus source (operator/tests/reconcile.rs).
OCR_TEST_PROMETHEUS="$(scripts/install-prometheus.sh)/prometheus"
export OCR_TEST_PROMETHEUS

# The real-cluster scenarios (e2e/tests/real_cluster.rs): Kubernetes v1.36 control plane from
# the workplace kit (../shared/k8s; OCR_TEST_K8S overrides) and Helm to render the chart.
# The kit sits beside the clone (../shared); a clone elsewhere on a workplace machine finds /work/shared.
if [ -z "${OCR_TEST_K8S:-}" ]; then
  for kit in "$(cd .. && pwd)/shared/k8s" /work/shared/k8s; do
    if [ -x "$kit/start-cluster.sh" ]; then OCR_TEST_K8S=$kit; break; fi
  done
fi
[ -n "${OCR_TEST_K8S:-}" ] || { echo "test: no Kubernetes control plane kit (../shared/k8s); set OCR_TEST_K8S"; exit 1; }
export OCR_TEST_K8S
OCR_TEST_HELM=$(scripts/install-helm.sh 4)
export OCR_TEST_HELM

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
