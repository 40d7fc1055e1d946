#!/usr/bin/env bash
# End-to-end suite on kind: build the images, start a cluster with MariaDB,
# Kafka, an S3 stand-in and a model server, install the operator with Helm,
# create a CPU OcrPipeline, and run e2e/scenarios/migrations.json (standard →
# batched → writer → standard, with pods deleted and killed, a revert and the
# operator's leader deleted on the way; the real-control-plane test in
# e2e/tests/real_cluster.rs runs the same file) while a client keeps
# submitting jobs. Then check that every job succeeded exactly once and that
# the pipeline ended where it should.
#
#   e2e/run.sh                  # everything, then delete the cluster
#   KEEP_CLUSTER=1 e2e/run.sh   # leave the cluster running (kubectl --context kind-ocr-e2e)
#
# Needs: docker (with BuildKit/buildx), kind, kubectl, helm 3.x or 4.x, curl, jq.
# Runs in bash 3.2 too (macOS). Settings (environment, defaults in brackets):
#   E2E_CLUSTER [ocr-e2e]         kind cluster name
#   E2E_REUSE_CLUSTER [0]         1: use an existing cluster of that name (and never delete it)
#   KEEP_CLUSTER [0]              1: do not delete the cluster at the end
#   E2E_SKIP_BUILD [0]            1: use images already built with the names below
#   E2E_IMAGE_PREFIX [ghcr.io/ocr-serving]  E2E_TAG [e2e]   names of the built images
#   E2E_MODEL_DIR []              files of scripts/fetch-models.sh to bake into the models
#                                 image instead of downloading them in the build
#   E2E_PRELOAD [1]               0: let the kind node pull third-party images itself
#   E2E_SUBMIT_INTERVAL [0.5]     seconds between two submissions
#   E2E_SETTLE [30]               seconds of traffic in each architecture before the next switch
#   E2E_READY_TIMEOUT [600]       seconds for the pipeline to become Ready (first start)
#   E2E_MIGRATION_TIMEOUT [600]   seconds for one migration
#   E2E_DRAIN_TIMEOUT [900]       seconds for the submitted jobs to finish after the last switch
#   E2E_PORT [18080]              local port of the API port-forward
#   E2E_ARTIFACTS [target/e2e/<time>]  job lists, status timeline, and diagnostics on failure
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
E2E="$ROOT/e2e"

# ------------------------------------------------------------------ pinned versions
KIND_VERSION=v0.30.0
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a}
# Third-party images named in e2e/manifests and e2e/pipeline.yaml (scripts/check-e2e.sh
# checks that this list and the manifests agree).
THIRD_PARTY_IMAGES="mariadb:11.4.7 apache/kafka:3.9.1 motoserver/moto:5.2.3 curlimages/curl:8.11.1"

# ------------------------------------------------------------------ settings
CLUSTER=${E2E_CLUSTER:-ocr-e2e}
CTX="kind-$CLUSTER"
REUSE_CLUSTER=${E2E_REUSE_CLUSTER:-0}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
SKIP_BUILD=${E2E_SKIP_BUILD:-0}
PRELOAD=${E2E_PRELOAD:-1}
IMAGE_PREFIX=${E2E_IMAGE_PREFIX:-ghcr.io/ocr-serving}
TAG=${E2E_TAG:-e2e}
RUNTIME_IMAGE="$IMAGE_PREFIX/ocr-runtime:$TAG"
OPERATOR_REPO="$IMAGE_PREFIX/ocr-operator"
OPERATOR_IMAGE="$OPERATOR_REPO:$TAG"
MODELS_IMAGE="$IMAGE_PREFIX/ocr-models:$TAG"
SUBMIT_INTERVAL=${E2E_SUBMIT_INTERVAL:-0.5}
SETTLE=${E2E_SETTLE:-30}
READY_TIMEOUT=${E2E_READY_TIMEOUT:-600}
MIGRATION_TIMEOUT=${E2E_MIGRATION_TIMEOUT:-600}
DRAIN_TIMEOUT=${E2E_DRAIN_TIMEOUT:-900}
PORT=${E2E_PORT:-18080}
ARTIFACTS=${E2E_ARTIFACTS:-$ROOT/target/e2e/$(date +%Y%m%d-%H%M%S)}

# The scenario both environments run: e2e/tests/real_cluster.rs reads the same file.
SCENARIO="$ROOT/e2e/scenarios/migrations.json"

NS=ocr
INFRA=ocr-infra
OPERATOR_NS=ocr-system
PIPELINE=ocr-e2e
API="http://127.0.0.1:$PORT"
# The tenant ocr-e2e's key, read from the Secret the pipeline names (api.auth.keysSecret).
API_KEY=""
RUN_ID="$(date +%s)-$$"
IMAGES_DIR="$ROOT/runtime/tests/data"
TEST_IMAGES="hello.png invoice.png"

# Files the background loops share (under $ARTIFACTS):
JOBS="$ARTIFACTS/jobs.tsv"              # seq, idempotency key, job id, image, submitted at (s)
SUBMIT_ERRORS="$ARTIFACTS/submit-errors.log"
STOP_FILE="$ARTIFACTS/stop-submitting"
TIMELINE="$ARTIFACTS/timeline.log"

CLUSTER_CREATED=0
PF_PID=""
SUBMIT_PID=""
STARTED=$(date +%s)

# ------------------------------------------------------------------ output
say() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - STARTED))" "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*" >&2; }
fail() {
  printf '\nE2E FAILED: %s\n' "$*" >&2
  exit 1
}

k() { kubectl --context "$CTX" "$@"; }
kn() { kubectl --context "$CTX" -n "$NS" "$@"; }
h() { helm --kube-context "$CTX" "$@"; }

# Image names in the checked-in manifests are the defaults; swap in the configured ones.
render() {
  sed -e "s#ghcr.io/ocr-serving/ocr-runtime:e2e#$RUNTIME_IMAGE#g" \
    -e "s#ghcr.io/ocr-serving/ocr-models:e2e#$MODELS_IMAGE#g" "$@"
}

# ------------------------------------------------------------------ teardown and diagnostics
dump_diagnostics() {
  local dir="$ARTIFACTS/diagnostics"
  mkdir -p "$dir"
  say "collecting diagnostics into $dir"
  k get nodes -o wide >"$dir/nodes.txt" 2>&1 || true
  k get all,cm,secrets,pdb,leases,events -A -o wide >"$dir/all.txt" 2>&1 || true
  kn get ocrp "$PIPELINE" -o yaml >"$dir/ocrpipeline.yaml" 2>&1 || true
  kn describe ocrp "$PIPELINE" >"$dir/ocrpipeline.describe.txt" 2>&1 || true
  local ns
  for ns in "$NS" "$INFRA" "$OPERATOR_NS"; do
    k -n "$ns" describe deployments,replicasets,pods,jobs >"$dir/$ns.describe.txt" 2>&1 || true
    k -n "$ns" get events --sort-by=.lastTimestamp >"$dir/$ns.events.txt" 2>&1 || true
    local pod
    for pod in $(k -n "$ns" get pods -o name 2>/dev/null); do
      local name=${pod#pod/}
      k -n "$ns" logs "$pod" --all-containers --prefix --timestamps >"$dir/$ns.$name.log" 2>&1 || true
      k -n "$ns" logs "$pod" --all-containers --prefix --timestamps --previous \
        >"$dir/$ns.$name.previous.log" 2>/dev/null || rm -f "$dir/$ns.$name.previous.log"
    done
  done
  # shellcheck disable=SC2016 # expanded by the shell in the MariaDB pod
  k -n "$INFRA" exec deploy/mariadb -- sh -c \
    'mariadb -u ocr -p"$MARIADB_PASSWORD" ocr -e "SELECT status, COUNT(*) FROM jobs GROUP BY status; SELECT id, status, attempts, error FROM jobs WHERE status <> \"Succeeded\" LIMIT 50"' \
    >"$dir/jobs-table.txt" 2>&1 || true
  kafka_exec kafka-consumer-groups.sh --describe --all-groups >"$dir/kafka-groups.txt" 2>&1 || true

  echo
  echo "---- OcrPipeline $NS/$PIPELINE"
  kn get ocrp "$PIPELINE" -o wide 2>&1 || true
  kn get ocrp "$PIPELINE" -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}' 2>&1 || true
  echo "---- pods"
  k get pods -A -o wide 2>&1 | grep -Ev ' kube-system | local-path-storage ' || true
  echo "---- operator log (last 40 lines of each replica)"
  local pod
  for pod in $(k -n "$OPERATOR_NS" get pods -o name 2>/dev/null); do
    k -n "$OPERATOR_NS" logs "$pod" --tail=40 --prefix 2>&1 || true
  done
  echo "---- pipeline pod logs (last 20 lines each)"
  for pod in $(kn get pods -o name 2>/dev/null); do
    kn logs "$pod" --all-containers --tail=20 --prefix 2>&1 || true
  done
  echo "---- full diagnostics: $dir"
}

stop_background() {
  if [[ -n "$SUBMIT_PID" ]]; then
    touch "$STOP_FILE" 2>/dev/null || true
    kill "$SUBMIT_PID" 2>/dev/null || true
    wait "$SUBMIT_PID" 2>/dev/null || true
    SUBMIT_PID=""
  fi
  if [[ -n "$PF_PID" ]]; then
    kill "$PF_PID" 2>/dev/null || true
    wait "$PF_PID" 2>/dev/null || true
    PF_PID=""
  fi
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  stop_background
  if [[ $rc -ne 0 && $CLUSTER_CREATED == 1 ]]; then
    dump_diagnostics
  fi
  if [[ $CLUSTER_CREATED == 1 ]]; then
    if [[ $KEEP_CLUSTER == 1 || $REUSE_CLUSTER == 1 ]]; then
      say "keeping cluster $CLUSTER (kubectl --context $CTX; delete it with: kind delete cluster --name $CLUSTER)"
    else
      say "deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
      kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || warn "kind delete cluster --name $CLUSTER failed"
    fi
  fi
  if [[ $rc -eq 0 ]]; then
    say "E2E PASSED in $(($(date +%s) - STARTED)) s (artifacts: $ARTIFACTS)"
  else
    say "E2E FAILED (exit $rc) after $(($(date +%s) - STARTED)) s; artifacts: $ARTIFACTS"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ helpers
# Runs a Kafka CLI tool inside the broker pod.
kafka_exec() {
  local tool=$1
  shift
  k -n "$INFRA" exec deploy/kafka -- "/opt/kafka/bin/$tool" --bootstrap-server localhost:9092 "$@"
}

# Runs SQL as the pipeline's database user; prints tab-separated rows without headers.
sql() {
  # shellcheck disable=SC2016 # expanded by the shell in the MariaDB pod
  k -n "$INFRA" exec deploy/mariadb -- sh -c 'mariadb -N -B -u ocr -p"$MARIADB_PASSWORD" ocr -e "$1"' sh "$1"
}

# Keeps `kubectl port-forward` to the API Service alive: it exits when its pod goes away.
start_port_forward() {
  (
    child=""
    trap 'if [[ -n "$child" ]]; then kill "$child" 2>/dev/null; fi; exit 0' TERM
    while :; do
      kubectl --context "$CTX" -n "$NS" port-forward "svc/$PIPELINE-api" "$PORT:80" \
        >>"$ARTIFACTS/port-forward.log" 2>&1 &
      child=$!
      wait "$child" || true
      child=""
      sleep 1
    done
  ) &
  PF_PID=$!
  for _ in $(seq 1 60); do
    if curl -fsS -m 2 "$API/readyz" >/dev/null 2>&1; then
      info "API reachable at $API (port-forward to svc/$PIPELINE-api)"
      API_KEY=$(kubectl -n "$NS" get secret ocr-api-keys -o jsonpath='{.data.ocr-e2e}' | base64 -d)
      [[ -n "$API_KEY" ]] || fail "no key for the tenant ocr-e2e in Secret $NS/ocr-api-keys"
      return 0
    fi
    sleep 1
  done
  fail "the API did not answer on $API/readyz within 60 s (see $ARTIFACTS/port-forward.log)"
}

# One submission as a careful client does it: the same Idempotency-Key on every retry, so a
# retried request after a lost answer is the same job. Prints the job id.
submit_one() {
  local key=$1 image=$2 attempt body code out
  out="$ARTIFACTS/.submit.$$"
  for attempt in $(seq 1 30); do
    code=$(curl -sS -m 10 -o "$out" -w '%{http_code}' -X POST --data-binary "@$IMAGES_DIR/$image" \
      -H 'content-type: image/png' -H "Idempotency-Key: $key" -H "Authorization: Bearer $API_KEY" \
      "$API/v1/jobs" 2>>"$SUBMIT_ERRORS") || code=000
    body=$(cat "$out" 2>/dev/null || true)
    case $code in
      200 | 201 | 202)
        local id
        id=$(printf '%s' "$body" | jq -r '.id // empty' 2>/dev/null || true)
        if [[ -n "$id" ]]; then
          rm -f "$out"
          printf '%s\n' "$id"
          return 0
        fi
        echo "$(date +%T) $key: HTTP $code without a job id: $body" >>"$SUBMIT_ERRORS"
        ;;
      000 | 409 | 429 | 500 | 502 | 503 | 504)
        # Not reachable, in flight under the same key, rate limited, or unavailable: retry.
        echo "$(date +%T) $key: attempt $attempt: HTTP $code $body" >>"$SUBMIT_ERRORS"
        ;;
      *)
        echo "$(date +%T) $key: rejected: HTTP $code $body" >>"$SUBMIT_ERRORS"
        rm -f "$out"
        return 1
        ;;
    esac
    sleep $((attempt < 5 ? 1 : 3))
  done
  rm -f "$out"
  return 1
}

# The client: submits until $STOP_FILE exists. A key that could not be submitted is recorded
# with job id "-" and fails the run at the end.
submitter() {
  local seq=0 image key id images
  # shellcheck disable=SC2206 # word splitting of the fixed list is intended
  images=($TEST_IMAGES)
  while [[ ! -f "$STOP_FILE" ]]; do
    seq=$((seq + 1))
    image=${images[$((seq % ${#images[@]}))]}
    key="e2e-$RUN_ID-$seq"
    if id=$(submit_one "$key" "$image"); then
      printf '%s\t%s\t%s\t%s\t%s\n' "$seq" "$key" "$id" "$image" "$(date +%s)" >>"$JOBS"
    else
      printf '%s\t%s\t%s\t%s\t%s\n' "$seq" "$key" "-" "$image" "$(date +%s)" >>"$JOBS"
    fi
    sleep "$SUBMIT_INTERVAL"
  done
}

submitted_count() { if [[ -f "$JOBS" ]]; then wc -l <"$JOBS" | tr -d ' '; else echo 0; fi; }

# Waits until the pipeline has observed its latest generation, runs `arch` fully rolled out
# (status.architecture), has no migration left and is Ready. Logs every status change.
wait_pipeline() {
  local arch=$1 timeout=$2 what=$3
  local deadline=$(($(date +%s) + timeout)) last="" seen_migrating=0
  while :; do
    local json gen obs st_arch phase mig ready migrating line
    json=$(kn get ocrp "$PIPELINE" -o json 2>/dev/null || echo '{}')
    gen=$(jq -r '.metadata.generation // 0' <<<"$json")
    obs=$(jq -r '.status.observedGeneration // 0' <<<"$json")
    st_arch=$(jq -r '.status.architecture // "-"' <<<"$json")
    phase=$(jq -r '.status.phase // "-"' <<<"$json")
    mig=$(jq -r 'if .status.migration then "\(.status.migration.from)→\(.status.migration.to):\(.status.migration.phase)" else "-" end' <<<"$json")
    ready=$(jq -r '([.status.conditions[]? | select(.type == "Ready") | .status] + ["-"])[0]' <<<"$json")
    migrating=$(jq -r '([.status.conditions[]? | select(.type == "Migrating") | "\(.status) \(.reason): \(.message)"] + ["-"])[0]' <<<"$json")
    line="generation=$gen observed=$obs architecture=$st_arch phase=$phase migration=$mig Ready=$ready Migrating=[$migrating]"
    if [[ "$line" != "$last" ]]; then
      info "[$(($(date +%s) - STARTED))s] $line"
      echo "$(date +%T) $what: $line" >>"$TIMELINE"
      last=$line
    fi
    if [[ $phase == Migrating || $mig != - ]]; then seen_migrating=1; fi
    if [[ $obs -ge $gen && $gen -gt 0 && $st_arch == "$arch" && $mig == - && $ready == True && $phase == Running ]]; then
      if [[ $what == migration* && $seen_migrating == 0 ]]; then
        info "(the migration finished between two polls: no Migrating phase was observed)"
      fi
      return 0
    fi
    if [[ $(date +%s) -ge $deadline ]]; then
      fail "$what: OcrPipeline $NS/$PIPELINE did not reach architecture=$arch, phase=Running, Ready=True within ${timeout}s (last status: $line)"
    fi
    sleep 2
  done
}

# The writer Deployment exists exactly in the writer architecture (checked once the pipeline
# is Ready, so a writer that is still draining after writer → X counts as a failure).
check_writer_deployment() {
  local arch=$1
  if kn get deploy "$PIPELINE-writer" >/dev/null 2>&1; then
    [[ $arch == writer ]] || fail "architecture $arch is Ready but the writer Deployment $NS/$PIPELINE-writer still exists"
    local available
    available=$(kn get deploy "$PIPELINE-writer" -o jsonpath='{.status.availableReplicas}')
    [[ ${available:-0} -ge 1 ]] || fail "writer Deployment has no available replica in the writer architecture"
    info "writer Deployment present, $available available replica(s)"
  else
    [[ $arch != writer ]] || fail "architecture writer is Ready but there is no writer Deployment $NS/$PIPELINE-writer"
    info "no writer Deployment (as expected in $arch)"
  fi
  local mode
  mode=$(kn get deploy "$PIPELINE-worker" -o jsonpath='{.spec.template.spec.containers[0].env[?(@.name=="OCR_WORKER__MODE")].value}')
  [[ $mode == "$arch" ]] || fail "worker Deployment runs OCR_WORKER__MODE=$mode in architecture $arch"
  info "worker Deployment: OCR_WORKER__MODE=$mode"
}

# Sum of ocr_jobs_finished_total{status="Succeeded"} over the pods of one role, read through
# the API server's pod proxy (the runtime image has no shell tools to exec).
finished_by_role() {
  local role=$1 total=0 pod n
  for pod in $(kn get pods -l "app.kubernetes.io/instance=$PIPELINE,app.kubernetes.io/component=$role" \
    --field-selector=status.phase=Running -o jsonpath='{.items[*].metadata.name}'); do
    n=$(k get --raw "/api/v1/namespaces/$NS/pods/$pod:8080/proxy/metrics" 2>/dev/null |
      awk '/^ocr_jobs_finished_total\{/ && /[Ss]ucceeded/ { s += $NF } END { printf "%d", s }') || n=0
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

set_architecture() {
  kn patch ocrp "$PIPELINE" --type merge -p "{\"spec\":{\"architecture\":\"$1\"}}" >/dev/null
}

# One disruption named in e2e/scenarios/migrations.json (the real-cluster test does the same).
disrupt() {
  local what=$1 pods victim
  case $what in
    delete-worker-pod | kill-worker-pod)
      pods=$(kn get pods -l "app.kubernetes.io/instance=$PIPELINE,app.kubernetes.io/component=worker" \
        -o jsonpath='{range .items[?(!@.metadata.deletionTimestamp)]}{.metadata.name}{"\n"}{end}')
      if [[ $what == delete-worker-pod ]]; then victim=$(head -n 1 <<<"$pods"); else victim=$(tail -n 1 <<<"$pods"); fi
      [[ -n $victim ]] || fail "no running worker pod to disrupt"
      if [[ $what == delete-worker-pod ]]; then
        kn delete pod "$victim" --wait=false >/dev/null
        info "deleted worker pod $victim"
      else
        # The kubelet kills the container at once: the closest kind has to SIGKILL.
        kn delete pod "$victim" --grace-period=0 --force --wait=false >/dev/null 2>&1
        info "killed worker pod $victim (force-deleted, grace 0)"
      fi
      ;;
    delete-operator-leader)
      victim=$(k -n "$OPERATOR_NS" get lease ocr-operator-leader -o jsonpath='{.spec.holderIdentity}')
      [[ -n $victim ]] || fail "the operator Lease has no holder"
      k -n "$OPERATOR_NS" delete pod "$victim" --wait=false >/dev/null
      info "deleted the operator's leader pod $victim"
      ;;
    *) fail "unknown disruption $what in $SCENARIO" ;;
  esac
}

wait_migration_started() {
  local deadline=$(($(date +%s) + 60))
  until [[ -n $(kn get ocrp "$PIPELINE" -o jsonpath='{.status.migration.phase}') ]]; do
    [[ $(date +%s) -lt $deadline ]] || fail "the migration did not start within 60s"
    sleep 0.5
  done
}

# One step of the scenario: switch to `to`, disrupt while it migrates, optionally flip the spec
# back to `revert_to` mid-way; then wait for the architecture it settles in.
migrate() {
  local from=$1 to=$2 revert_to=$3 disruptions=$4 settled=$2 what
  say "migrating $from → $to while jobs keep arriving ($(submitted_count) submitted so far)"
  if [[ $from == writer ]]; then
    local persisted
    persisted=$(finished_by_role writer)
    info "the writer persisted $persisted job(s) so far"
    [[ $persisted -gt 0 ]] || fail "in the writer architecture the writer persisted no job (ocr_jobs_finished_total on the writer pods is 0)"
  fi
  set_architecture "$to"
  if [[ -n $disruptions || -n $revert_to ]]; then
    wait_migration_started
  fi
  for what in $disruptions; do disrupt "$what"; done
  if [[ -n $revert_to ]]; then
    set_architecture "$revert_to"
    info "spec.architecture flipped back to $revert_to mid-migration"
    settled=$revert_to
  fi
  wait_pipeline "$settled" "$MIGRATION_TIMEOUT" "migration $from → $to${revert_to:+ reverted to $revert_to}"
  check_writer_deployment "$settled"
  info "jobs flow in $settled for ${SETTLE}s"
  sleep "$SETTLE"
  CURRENT=$settled
}

# ------------------------------------------------------------------ 0. prerequisites
mkdir -p "$ARTIFACTS"
: >"$JOBS"
: >"$SUBMIT_ERRORS"
: >"$TIMELINE"
rm -f "$STOP_FILE"

say "prerequisites"
missing=""
for tool in docker kind kubectl helm curl jq; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
[[ -z "$missing" ]] || fail "missing tools:$missing (see e2e/README.md)"
docker info >/dev/null 2>&1 || fail "docker cannot reach a Docker engine (is it running? can this user use it?)"
if [[ $SKIP_BUILD != 1 ]]; then
  docker buildx version >/dev/null 2>&1 || fail "the Dockerfile needs BuildKit: install the docker buildx plugin (Docker Desktop and docker-ce ship it)"
fi
kind_version=$(kind version 2>/dev/null | awk '{print $2}')
[[ "$kind_version" == "$KIND_VERSION" ]] || warn "kind $kind_version found; the suite is pinned to kind $KIND_VERSION and its node image $KIND_NODE_IMAGE"
info "docker $(docker version --format '{{.Server.Version}}' 2>/dev/null), kind $kind_version, $(kubectl version --client 2>/dev/null | head -n 1), helm $(helm version --template '{{.Version}}' 2>/dev/null)"
for image in $TEST_IMAGES; do
  [[ -s "$IMAGES_DIR/$image" ]] || fail "test image $IMAGES_DIR/$image is missing"
done
info "artifacts: $ARTIFACTS"

# ------------------------------------------------------------------ 1. images
if [[ $SKIP_BUILD == 1 ]]; then
  say "E2E_SKIP_BUILD=1: using the images already built"
  for image in "$RUNTIME_IMAGE" "$OPERATOR_IMAGE" "$MODELS_IMAGE"; do
    docker image inspect "$image" >/dev/null 2>&1 || fail "E2E_SKIP_BUILD=1 but image $image does not exist"
  done
else
  say "building $RUNTIME_IMAGE (the first build compiles the workspace: many minutes)"
  docker build --target runtime -t "$RUNTIME_IMAGE" "$ROOT"
  say "building $OPERATOR_IMAGE"
  docker build --target operator -t "$OPERATOR_IMAGE" "$ROOT"
  say "building $MODELS_IMAGE"
  if [[ -n "${E2E_MODEL_DIR:-}" ]]; then
    [[ -d "$E2E_MODEL_DIR" ]] || fail "E2E_MODEL_DIR=$E2E_MODEL_DIR is not a directory"
    docker build --target models --build-context "model-files=$E2E_MODEL_DIR" -t "$MODELS_IMAGE" "$ROOT"
  else
    docker build --target models -t "$MODELS_IMAGE" "$ROOT"
  fi
fi

# ------------------------------------------------------------------ 2. cluster
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  [[ $REUSE_CLUSTER == 1 ]] || fail "a kind cluster named $CLUSTER exists already: delete it (kind delete cluster --name $CLUSTER) or set E2E_REUSE_CLUSTER=1"
  say "reusing kind cluster $CLUSTER"
  CLUSTER_CREATED=1
else
  say "creating kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
  CLUSTER_CREATED=1
  kind create cluster --name "$CLUSTER" --config "$E2E/kind.yaml" --image "$KIND_NODE_IMAGE" --wait 180s
fi
k cluster-info >/dev/null || fail "kubectl cannot reach the cluster through context $CTX"

say "loading images into the kind node"
kind load docker-image --name "$CLUSTER" "$RUNTIME_IMAGE" "$OPERATOR_IMAGE" "$MODELS_IMAGE" \
  || fail "kind load docker-image failed for the project's images"
if [[ $PRELOAD == 1 ]]; then
  for image in $THIRD_PARTY_IMAGES; do
    if ! docker image inspect "$image" >/dev/null 2>&1; then
      docker pull --quiet "$image" >/dev/null || { warn "docker pull $image failed; the node will pull it"; continue; }
    fi
    # Fails for some multi-platform images with Docker's containerd image store: the node
    # then pulls the image itself.
    kind load docker-image --name "$CLUSTER" "$image" >/dev/null 2>&1 \
      || warn "kind load $image failed; the node will pull it"
  done
fi

# ------------------------------------------------------------------ 3. dependencies
say "deploying MariaDB, Kafka, the S3 stand-in and the model server (e2e/manifests)"
for manifest in "$E2E"/manifests/*.yaml; do
  render "$manifest" | k apply -f - >/dev/null || fail "kubectl apply $manifest"
  info "applied ${manifest#"$ROOT"/}"
done
for deploy in mariadb kafka s3 ocr-models; do
  k -n "$INFRA" rollout status "deploy/$deploy" --timeout=300s \
    || fail "$INFRA/$deploy did not become available within 300 s"
done
k -n "$INFRA" wait --for=condition=complete job/create-bucket --timeout=180s \
  || fail "the job creating the S3 bucket did not complete"
ok=0
for _ in $(seq 1 30); do
  if kafka_exec kafka-topics.sh --list >/dev/null 2>&1; then ok=1 && break; fi
  sleep 3
done
[[ $ok == 1 ]] || fail "Kafka does not answer kafka-topics.sh --list"
info "MariaDB, Kafka, S3 bucket and model server are up"

# ------------------------------------------------------------------ 4. operator
say "installing the operator: helm install ocr-operator charts/ocr-operator"
h upgrade --install ocr-operator "$ROOT/charts/ocr-operator" \
  --namespace "$OPERATOR_NS" --create-namespace \
  --set "image.repository=$OPERATOR_REPO" --set "image.tag=$TAG" --set image.pullPolicy=Never \
  --wait --timeout 5m || fail "helm install of charts/ocr-operator failed"
k wait --for=condition=Established crd/ocrpipelines.ocr.serving.dev --timeout=60s >/dev/null
info "operator: $(k -n "$OPERATOR_NS" get deploy -o jsonpath='{range .items[*]}{.metadata.name} {.status.readyReplicas}/{.spec.replicas} ready{end}')"

# ------------------------------------------------------------------ 5. pipeline
say "creating OcrPipeline $NS/$PIPELINE (standard, CPU, PP-OCRv6 tiny)"
render "$E2E/pipeline.yaml" | k apply -f - >/dev/null || fail "kubectl apply e2e/pipeline.yaml"
wait_pipeline standard "$READY_TIMEOUT" "first start"
check_writer_deployment standard
info "topics: $(kn get ocrp "$PIPELINE" -o jsonpath='{.status.topics}')"

# ------------------------------------------------------------------ 6. traffic + migrations
say "port-forwarding the API and starting the client (one job every ${SUBMIT_INTERVAL}s)"
start_port_forward
submitter &
SUBMIT_PID=$!
sleep "$SETTLE"
[[ $(submitted_count) -gt 0 ]] || fail "no job could be submitted in ${SETTLE}s (see $SUBMIT_ERRORS)"

CURRENT=$(jq -r '.start' "$SCENARIO")
# '|' separates the fields: unlike a tab it keeps an empty revert_to in its place.
while IFS='|' read -r to revert_to disruptions; do
  migrate "$CURRENT" "$to" "$revert_to" "$disruptions"
done < <(jq -r '.steps[] | [.to, (.revert_to // ""), ((.disrupt // []) | join(" "))] | join("|")' "$SCENARIO")

say "stopping the client"
touch "$STOP_FILE"
wait "$SUBMIT_PID" || true
SUBMIT_PID=""
TOTAL=$(submitted_count)
info "$TOTAL job(s) submitted"

# ------------------------------------------------------------------ 7. assertions
say "waiting for every job to finish (up to ${DRAIN_TIMEOUT}s)"
unsubmitted=$(awk -F'\t' '$3 == "-"' "$JOBS" | wc -l | tr -d ' ')
[[ $unsubmitted -eq 0 ]] || fail "$unsubmitted submission(s) never got a job id after retries: $(awk -F'\t' '$3 == "-" { print $2 }' "$JOBS" | head -n 5 | tr '\n' ' ') (see $SUBMIT_ERRORS)"
dups=$(cut -f3 "$JOBS" | sort | uniq -d | wc -l | tr -d ' ')
[[ $dups -eq 0 ]] || fail "$dups job id(s) were returned for two different idempotency keys"

STATUS="$ARTIFACTS/final-status.tsv"
deadline=$(($(date +%s) + DRAIN_TIMEOUT))
while :; do
  : >"$STATUS"
  pending=0
  while IFS=$'\t' read -r seq key id image _; do
    st=$(curl -sS -m 10 -H "Authorization: Bearer $API_KEY" "$API/v1/jobs/$id" 2>/dev/null | jq -r '.status // "unknown"' 2>/dev/null || echo unknown)
    printf '%s\t%s\t%s\t%s\t%s\n' "$seq" "$key" "$id" "$image" "$st" >>"$STATUS"
    case $st in
      Succeeded | Failed | DeadLettered) ;;
      *) pending=$((pending + 1)) ;;
    esac
  done <"$JOBS"
  summary=$(cut -f5 "$STATUS" | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')
  info "[$(($(date +%s) - STARTED))s] $summary"
  [[ $pending -gt 0 ]] || break
  [[ $(date +%s) -lt $deadline ]] || fail "$pending job(s) still not final after ${DRAIN_TIMEOUT}s: $summary (see $STATUS)"
  sleep 10
done

bad=$(awk -F'\t' '$5 != "Succeeded"' "$STATUS" | wc -l | tr -d ' ')
if [[ $bad -ne 0 ]]; then
  awk -F'\t' '$5 != "Succeeded" { print "    " $2 " " $3 " " $5 }' "$STATUS" | head -n 20 >&2
  for id in $(awk -F'\t' '$5 != "Succeeded" { print $3 }' "$STATUS" | head -n 5); do
    echo "    $id: $(curl -sS -m 10 -H "Authorization: Bearer $API_KEY" "$API/v1/jobs/$id" 2>/dev/null)" >&2
  done
  fail "$bad of $TOTAL job(s) did not end Succeeded ($summary)"
fi
info "all $TOTAL job(s) Succeeded"

say "checking results, the database, Kafka and the final status"
no_result=0
text_hits=0
while IFS=$'\t' read -r _ key id image _; do
  code=$(curl -sS -m 10 -o "$ARTIFACTS/.result" -w '%{http_code}' -H "Authorization: Bearer $API_KEY" "$API/v1/jobs/$id/result" 2>/dev/null) || code=000
  if [[ $code != 200 ]] || ! jq -e . "$ARTIFACTS/.result" >/dev/null 2>&1; then
    no_result=$((no_result + 1))
    echo "$key $id: GET /result -> HTTP $code" >>"$ARTIFACTS/result-errors.log"
    continue
  fi
  want=Hello
  [[ $image == invoice.png ]] && want=Invoice
  grep -qi "$want" "$ARTIFACTS/.result" && text_hits=$((text_hits + 1))
done <"$STATUS"
rm -f "$ARTIFACTS/.result"
[[ $no_result -eq 0 ]] || fail "$no_result Succeeded job(s) have no readable result (see $ARTIFACTS/result-errors.log)"
info "every job has its result document; $text_hits of $TOTAL contain the expected word (Hello / Invoice)"
[[ $text_hits -gt 0 ]] || warn "no result contains the expected text: is the model right?"

# The job table has exactly one row per submitted key, and every row of this run is Succeeded.
rows=$(sql "SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE 'e2e-$RUN_ID-%'") || fail "cannot query the jobs table"
keys=$(sql "SELECT COUNT(DISTINCT idempotency_key) FROM jobs WHERE idempotency_key LIKE 'e2e-$RUN_ID-%'")
not_ok=$(sql "SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE 'e2e-$RUN_ID-%' AND status <> 'Succeeded'")
info "jobs table: $rows row(s) for $keys key(s) of this run, $not_ok not Succeeded"
[[ $rows -eq $keys ]] || fail "the jobs table has $rows row(s) for only $keys idempotency key(s): a key produced two jobs"
[[ $rows -eq $TOTAL ]] || fail "the jobs table has $rows row(s) for this run but $TOTAL job(s) were submitted (a duplicate or a lost job)"
[[ $not_ok -eq 0 ]] || fail "$not_ok job row(s) of this run are not Succeeded"

# Nothing dead-lettered, nothing left unconsumed.
# The names come from the status: by default they derive from the pipeline's namespace and name.
dead_letter=$(kn get ocrp "$PIPELINE" -o jsonpath='{.status.queues.deadLetterTopic}')
worker_group=$(kn get ocrp "$PIPELINE" -o jsonpath='{.status.queues.consumerGroup}')
[[ -n $dead_letter && -n $worker_group ]] || fail "status.queues does not name the dead-letter topic and the worker group"
dlq=$(kafka_exec kafka-get-offsets.sh --topic "$dead_letter" 2>/dev/null | awk -F: '{ s += $3 } END { printf "%d", s }') || dlq=unknown
[[ $dlq == 0 ]] || fail "the dead-letter topic $dead_letter holds $dlq message(s)"
info "dead-letter topic $dead_letter is empty"
lag=$(kafka_exec kafka-consumer-groups.sh --describe --group "$worker_group" 2>/dev/null |
  awk -v g="$worker_group" '$1 == g && $6 ~ /^[0-9]+$/ { s += $6 } END { printf "%d", s }') || lag=unknown
[[ $lag == 0 ]] || fail "the worker group $worker_group has lag $lag on the jobs topic"
info "worker group $worker_group has no lag"

wait_pipeline "$CURRENT" 60 "final status"
final_arch=$(kn get ocrp "$PIPELINE" -o jsonpath='{.status.architecture}')
[[ $final_arch == "$CURRENT" ]] || fail "status.architecture is $final_arch, expected $CURRENT (the scenario's last step)"
check_writer_deployment "$CURRENT"
restarts=$(kn get pods -o jsonpath='{range .items[*]}{range .status.containerStatuses[*]}{.restartCount}{"\n"}{end}{end}' | awk '{ s += $1 } END { printf "%d", s }')
[[ $restarts -eq 0 ]] || warn "pipeline containers restarted $restarts time(s) (see the pod logs)"
info "status.architecture=$final_arch, Ready, writer only where the architecture is writer"
cp "$STATUS" "$ARTIFACTS/jobs-final.tsv"
