#!/usr/bin/env bash
# Static checks of the container images and the kind end-to-end suite (no Docker engine or
# cluster needed; e2e/run.sh itself needs both):
#
#   1. bash -n and shellcheck on e2e/*.sh and this script.
#   2. e2e/manifests/*.yaml against the Kubernetes OpenAPI schemas of 1.30, 1.33 and 1.35
#      (kubernetes-validate, strict: unknown fields fail); Service selectors and named
#      target ports against the pods they front; every namespace used is created.
#   3. e2e/pipeline.yaml against the OcrPipeline CRD (crds/ocrpipeline.yaml): openAPIV3Schema
#      after defaulting, unknown fields rejected, and its CEL rules (cel-python); the Secrets,
#      Services and S3 bucket (spec.blob.s3) it names exist in e2e/manifests.
#      The schema and CRD checks are scripts/k8s_checks.py, shared with scripts/check-chart.sh.
#   4. e2e/kind.yaml by hand (kind's config has no OpenAPI schema): apiVersion, kind, fields.
#   5. Consistency: the third-party images run.sh preloads are exactly those the manifests
#      name; the project's images they name are the ones run.sh builds, loads and render()s;
#      the model archive the pipeline downloads is one the Dockerfile builds, from files
#      scripts/fetch-models.sh produces; the Dockerfile's stages, targets and COPY --from
#      references; .dockerignore keeps what the build needs; the test images exist.
#
# Tools are installed once, pinned, under ${OCR_TOOLS_DIR:-~/.cache/ocr-serving}: a Python venv
# (venv-e2e-check) with kubernetes-validate, jsonschema and cel-python, pinned in
# scripts/k8s_checks_venv.sh (shared with scripts/check-chart.sh). shellcheck comes from
# Debian's package (apt-get, as root) when it is not on PATH.
# Needs: bash, python3 (with venv), and apt-get or shellcheck.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}"
KUBE_VERSIONS="1.30.0 1.33.0 1.35.0"

# shellcheck source=SCRIPTDIR/k8s_checks_venv.sh
. "$ROOT/scripts/k8s_checks_venv.sh" # K8S_CHECKS_REQUIREMENTS, k8s_checks_venv

say() { printf '==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- tools
if ! command -v shellcheck >/dev/null; then
  if ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
    die "shellcheck is missing: install it (Debian/Ubuntu: apt-get install shellcheck)"
  fi
  say "installing shellcheck (Debian package)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; } >/dev/null \
    || die "apt-get install shellcheck"
fi
PY=$(k8s_checks_venv "$TOOLS/venv-e2e-check")
say "tools: $(shellcheck --version | sed -n 's/^version: /shellcheck /p'), kubernetes-validate $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)'), cel-python 0.5.0"

# ---------------------------------------------------------------- 1. shell
SCRIPTS=("$ROOT"/e2e/*.sh "$ROOT/scripts/check-e2e.sh")
say "bash -n and shellcheck: ${SCRIPTS[*]#"$ROOT"/}"
for f in "${SCRIPTS[@]}"; do
  bash -n "$f" || die "bash -n $f"
  [[ -x "$f" ]] || die "$f is not executable"
done
shellcheck --severity=style --external-sources "${SCRIPTS[@]}" || die "shellcheck"
echo "    clean"

# ---------------------------------------------------------------- 2-5. manifests and consistency
say "manifests (Kubernetes $KUBE_VERSIONS, strict), the OcrPipeline against its CRD, kind config, consistency"
cat >"$WORK/check.py" <<'PYEOF'
import glob, os, re, sys

ROOT = os.environ["ROOT"]
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.dont_write_bytecode = True  # leave no scripts/__pycache__ in the checkout
from k8s_checks import fail, exit_on_failures, failures, ident, load, k8s_validate, kube_versions_label, validate_custom

KUBE_VERSIONS = os.environ["KUBE_VERSIONS"].split()

def rel(path):
    return os.path.relpath(path, ROOT)

# ---- 2. manifests against the Kubernetes schemas
manifests = sorted(glob.glob(os.path.join(ROOT, "e2e/manifests/*.yaml")))
if not manifests:
    fail("e2e/manifests", "no manifests")
objects = []
for path in manifests:
    docs = load(path)
    if not docs:
        fail(rel(path), "no objects")
    for d in docs:
        where = f"{rel(path)} {ident(d)}"
        if k8s_validate(where, d, KUBE_VERSIONS):
            print(f"    ok   {where}: {d['apiVersion']} schema, Kubernetes {kube_versions_label(KUBE_VERSIONS)}")
        objects.append((rel(path), d))

def pod_templates():
    for path, o in objects:
        spec = o.get("spec") or {}
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield path, o, spec["template"]
        elif o["kind"] == "Job":
            yield path, o, spec["template"]

namespaces = {o["metadata"]["name"] for _, o in objects if o["kind"] == "Namespace"}
for path, o in objects:
    ns = o["metadata"].get("namespace")
    if o["kind"] != "Namespace" and ns not in namespaces:
        fail(f"{path} {ident(o)}", f"namespace {ns!r} is not created by e2e/manifests")
for path, o, tpl in pod_templates():
    sel = ((o["spec"].get("selector") or {}).get("matchLabels")) or {}
    labels = (tpl.get("metadata") or {}).get("labels") or {}
    if not sel.items() <= labels.items():
        fail(f"{path} {ident(o)}", "selector does not match the pod template's labels")
for path, svc in [(p, o) for p, o in objects if o["kind"] == "Service"]:
    targets = [(p, o, t) for p, o, t in pod_templates()
               if o["metadata"].get("namespace") == svc["metadata"].get("namespace")
               and svc["spec"]["selector"].items() <= ((t.get("metadata") or {}).get("labels") or {}).items()]
    if not targets:
        fail(f"{path} {ident(svc)}", "selects no pod template")
    for _, o, t in targets:
        ports = {p.get("name"): p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if tp not in ports and tp not in ports.values():
                fail(f"{path} {ident(svc)}", f"targetPort {tp!r} is not a port of {ident(o)}")
print(f"    {len(objects)} object(s); namespaces, selectors and target ports consistent")

# ---- 3. the OcrPipeline against the CRD
crd = load(os.path.join(ROOT, "crds/ocrpipeline.yaml"))[0]
pipelines = load(os.path.join(ROOT, "e2e/pipeline.yaml"))
if len(pipelines) != 1 or pipelines[0].get("kind") != "OcrPipeline":
    fail("e2e/pipeline.yaml", "must hold exactly one OcrPipeline")
pipeline = pipelines[0]
where = f"e2e/pipeline.yaml {ident(pipeline)}"
result = validate_custom(where, pipeline, crd)
if result and result[0]:
    print(f"    ok   {where}: {crd['metadata']['name']} openAPIV3Schema, {result[1]} CEL rule(s)")
spec = pipeline.get("spec") or {}
if pipeline["metadata"].get("namespace") not in namespaces:
    fail(where, f"namespace {pipeline['metadata'].get('namespace')!r} is not created by e2e/manifests")
secrets = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for _, o in objects if o["kind"] == "Secret"}
db = spec["database"]["secret"]
sec = secrets.get((pipeline["metadata"]["namespace"], db["name"]))
if sec is None or db.get("key", "url") not in (sec.get("stringData") or {}):
    fail(where, f"database secret {db['name']} (key {db.get('key', 'url')}) is not in e2e/manifests")
# API keys (the CRD requires them by default): the Secret run.sh reads its key from.
keys_secret = ((spec.get("api") or {}).get("auth") or {}).get("keysSecret")
api_keys = secrets.get((pipeline["metadata"]["namespace"], keys_secret)) if keys_secret else None
if api_keys is None:
    fail(where, f"api.auth.keysSecret {keys_secret!r} is not a Secret in e2e/manifests (run.sh submits with its key)")
elif "ocr-e2e" not in (api_keys.get("stringData") or {}):
    fail(where, f"Secret {keys_secret} has no key for the tenant ocr-e2e, which run.sh submits as")
elif len(api_keys["stringData"]["ocr-e2e"].strip()) < 32:
    fail(where, f"the ocr-e2e key in Secret {keys_secret} is shorter than 32 characters (the runtime refuses it)")
services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for _, o in objects if o["kind"] == "Service"}
def in_cluster(host_port, what):
    m = re.match(r"^(?:https?://)?([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", host_port)
    if not m:
        fail(where, f"{what} {host_port!r} is not <service>.<namespace>.svc.cluster.local:<port>")
        return
    svc = services.get((m.group(2), m.group(1)))
    if svc is None or int(m.group(3)) not in [p["port"] for p in svc["spec"]["ports"]]:
        fail(where, f"{what} {host_port!r} names no Service port in e2e/manifests")
in_cluster(spec["kafka"]["bootstrapServers"], "kafka.bootstrapServers")
in_cluster(spec["model"]["source"]["url"], "model.source.url")
in_cluster(sec["stringData"]["url"].split("@", 1)[1] if sec else "", "the database URL")
if spec["kafka"].get("replicationFactor", 3) != 1:
    fail(where, "kafka.replicationFactor must be 1 (one broker)")
# The blob store: API, worker and writer pods must share one, so spec.blob.s3 names the S3
# stand-in, a bucket its Job creates there, and a Secret with both AWS_* keys.
s3 = (spec.get("blob") or {}).get("s3")
if not s3:
    fail(where, "blob.s3 must point at the S3 stand-in of e2e/manifests (the pods need one shared blob store)")
else:
    endpoint = (s3.get("endpoint") or "").rstrip("/")
    in_cluster(endpoint, "blob.s3.endpoint")
    created = set()
    for _, o, tpl in pod_templates():
        if o["kind"] != "Job":
            continue
        for c in tpl["spec"]["containers"]:
            script = " ".join(c.get("command", []) + c.get("args", []))
            created |= set(re.findall(r"-X PUT (https?://[^\s/]+)/([a-z0-9][a-z0-9.-]*[a-z0-9])\b", script))
    if (endpoint, s3["bucket"]) not in created:
        fail(where, f"blob.s3 bucket {s3['bucket']!r} at {endpoint!r} is not created by a Job in e2e/manifests "
                    f"(they create {sorted(created)})")
    cred = s3.get("credentialsSecret")
    cred_secret = secrets.get((pipeline["metadata"]["namespace"], cred)) if cred else None
    if cred_secret is None:
        fail(where, f"blob.s3.credentialsSecret {cred!r} is not a Secret in e2e/manifests "
                    "(without one the runtime's S3 client looks for a cloud identity)")
    else:
        keys = set(cred_secret.get("stringData") or {}) | set(cred_secret.get("data") or {})
        missing = sorted({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} - keys)
        if missing:
            fail(where, f"Secret {cred} has no key(s) {missing}")

# ---- 4. kind config
kind_cfg = load(os.path.join(ROOT, "e2e/kind.yaml"))
if len(kind_cfg) != 1:
    fail("e2e/kind.yaml", "must hold one document")
else:
    c = kind_cfg[0]
    if (c.get("apiVersion"), c.get("kind")) != ("kind.x-k8s.io/v1alpha4", "Cluster"):
        fail("e2e/kind.yaml", f"apiVersion/kind {c.get('apiVersion')}/{c.get('kind')}, expected kind.x-k8s.io/v1alpha4 Cluster")
    top = {"apiVersion", "kind", "name", "nodes", "networking", "featureGates", "runtimeConfig",
           "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902", "containerdConfigPatches",
           "containerdConfigPatchesJSON6902"}
    node_keys = {"role", "image", "labels", "extraMounts", "extraPortMappings", "kubeadmConfigPatches",
                 "kubeadmConfigPatchesJSON6902"}
    if set(c) - top:
        fail("e2e/kind.yaml", f"unknown fields {sorted(set(c) - top)}")
    nodes = c.get("nodes") or []
    if not any(n.get("role") == "control-plane" for n in nodes):
        fail("e2e/kind.yaml", "no control-plane node")
    for i, n in enumerate(nodes):
        if set(n) - node_keys:
            fail("e2e/kind.yaml", f"nodes[{i}]: unknown fields {sorted(set(n) - node_keys)}")
        if n.get("role") not in ("control-plane", "worker"):
            fail("e2e/kind.yaml", f"nodes[{i}]: role {n.get('role')!r}")
        if "image" in n:
            fail("e2e/kind.yaml", f"nodes[{i}]: the node image is pinned in e2e/run.sh (--image), not here")
    print(f"    ok   e2e/kind.yaml: {len(nodes)} node(s)")

# ---- 5. consistency
run_sh = open(os.path.join(ROOT, "e2e/run.sh")).read()
m = re.search(r'^THIRD_PARTY_IMAGES="([^"]*)"', run_sh, re.M)
preloaded = set(m.group(1).split()) if m else set()
if not m:
    fail("e2e/run.sh", "no THIRD_PARTY_IMAGES line")
images_before = len(failures)
named = set()
for _, o, tpl in pod_templates():
    for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
        named.add(c["image"])
named.add(spec["images"]["modelFetcher"])
own = {i for i in named if i.startswith("ghcr.io/ocr-serving/")}
third = named - own
if third != preloaded:
    fail("e2e/run.sh", f"THIRD_PARTY_IMAGES {sorted(preloaded)} differs from the images the manifests name {sorted(third)}")
# The project's images the files name are the defaults of images run.sh builds and `kind
# load`s, and render() swaps each for the configured name (no stale or overlapping patterns).
defaults = {}
for var, default in re.findall(r'^(\w+)=\$\{E2E_(?:IMAGE_PREFIX|TAG):-([^}]*)\}', run_sh, re.M):
    defaults[var] = default
image_vars = {}
for var, value in re.findall(r'^(\w+(?:_IMAGE|_REPO))="([^"]*)"', run_sh, re.M):
    image_vars[var] = re.sub(r"\$(\w+)", lambda mm: image_vars.get(mm.group(1), defaults.get(mm.group(1), mm.group(0))), value)
built = {image_vars.get(v) for v in re.findall(r'^\s*docker build [^\n]*-t "\$(\w+)"', run_sh, re.M)}
kind_load = re.search(r'^kind load docker-image --name "\$CLUSTER" ([^\n\\]*)', run_sh, re.M)
loaded = {image_vars.get(v) for v in re.findall(r'"\$(\w+)"', kind_load.group(1))} if kind_load else set()
render = re.search(r"^render\(\) \{\n(.*?)^\}", run_sh, re.M | re.S)
substitutions = dict(re.findall(r'-e "s#([^#]+)#\$(\w+)#g"', render.group(1))) if render else {}
ours = own | {spec["images"]["runtime"]}
for image in sorted(ours):
    if image not in built:
        fail("e2e/run.sh", f"{image} is named by the manifests but not built by a `docker build -t` (builds {sorted(built - {None})})")
    if image not in loaded:
        fail("e2e/run.sh", f"{image} is not in the `kind load docker-image` of the project's images")
    var = substitutions.get(image)
    if var is None:
        fail("e2e/run.sh", f"render() does not substitute {image}")
    elif image_vars.get(var) != image:
        fail("e2e/run.sh", f"render() replaces {image} with ${var}, whose default is {image_vars.get(var)}")
for pattern in sorted(substitutions):
    if pattern not in ours:
        fail("e2e/run.sh", f"render() substitutes {pattern}, which no manifest names")
    for image in named | {spec["images"]["runtime"]}:
        if image != pattern and image.startswith(pattern):
            fail("e2e/run.sh", f"render()'s pattern {pattern} also rewrites part of {image}")
for image in sorted(third):
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        fail("e2e", f"image {image} is not pinned to a tag")
for _, o, tpl in pod_templates():
    for c in tpl["spec"]["containers"]:
        if c["image"].startswith("ghcr.io/ocr-serving/") and c.get("imagePullPolicy") != "Never":
            fail(ident(o), f"{c['image']} is built locally: imagePullPolicy must be Never")
if len(failures) == images_before:
    print(f"    ok   images: {len(third)} third-party (all preloaded by run.sh), {len(ours)} built, loaded and render()ed by run.sh")

dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
stages, froms = [], []
for line in dockerfile.splitlines():
    mm = re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.I)
    if mm:
        froms.append(mm.group(1))
        if mm.group(2):
            if mm.group(2) in stages:
                fail("Dockerfile", f"stage {mm.group(2)} defined twice")
            stages.append(mm.group(2))
        else:
            fail("Dockerfile", f"unnamed stage: {line}")
for mm in re.finditer(r"--from=(\S+)", dockerfile):
    ref = mm.group(1)
    if ref not in stages:
        fail("Dockerfile", f"COPY --from={ref} names no stage")
        continue
    # A stage may only copy from one defined before it.
    current = dockerfile[:mm.start()].count("\nFROM ") - 1
    if stages.index(ref) >= current:
        fail("Dockerfile", f"COPY --from={ref} in stage {stages[current]} refers to a later stage")
for target in ("runtime", "runtime-cuda", "operator", "models", "model-files"):
    if target not in stages:
        fail("Dockerfile", f"no stage {target}")
if stages and stages[-1] != "runtime":
    fail("Dockerfile", "the last (default) stage must be runtime")
for name, entry in (("runtime", '["ocr-runtime"]'), ("runtime-cuda", '["ocr-runtime"]'), ("operator", '["ocr-operator"]')):
    body = dockerfile.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0] if f" AS {name}\n" in dockerfile else ""
    if f"ENTRYPOINT {entry}" not in body:
        fail("Dockerfile", f"stage {name} must have ENTRYPOINT {entry}")
    if not re.search(r"^USER 65532:65532$", body, re.M):
        fail("Dockerfile", f"stage {name} must run as USER 65532:65532")
declared = set(re.findall(r"^ARG (\w+)", dockerfile.split("\nFROM ", 1)[0], re.M))
for f in froms:
    for var in re.findall(r"\$\{(\w+)\}", f):
        if var not in declared:
            fail("Dockerfile", f"FROM {f} uses ${{{var}}}, which is not declared before the first FROM")
if len(re.findall(r"--mount=type=cache,id=ocr-target-", dockerfile)) < 3:
    fail("Dockerfile", "every cargo build must use a target-directory cache mount")
if "--features cuda" not in dockerfile or "CUDA_COMPUTE_CAP" not in dockerfile:
    fail("Dockerfile", "the CUDA build must pass --features cuda and CUDA_COMPUTE_CAP")

# Model archives: the files exist in scripts/fetch-models.sh; the pipeline's URL is built.
fetch = open(os.path.join(ROOT, "scripts/fetch-models.sh")).read()
fetched = set(re.findall(r'^\s*"([a-z0-9_]+\.(?:onnx|txt))\|', fetch, re.M))
archives = {}
for mm in re.finditer(r"^\s*pack (\S+) ([^;]+);", dockerfile, re.M):
    archives[mm.group(1)] = mm.group(2).split()
    for f in mm.group(2).split():
        if f not in fetched:
            fail("Dockerfile", f"archive {mm.group(1)} packs {f}, which scripts/fetch-models.sh does not produce")
url_file = spec["model"]["source"]["url"].rsplit("/", 1)[-1]
if not url_file.endswith(".tar.gz") or url_file[:-7] not in archives:
    fail(where, f"model.source.url names {url_file}, which the Dockerfile's models stage does not build ({sorted(archives)})")
variant = spec["model"]["variant"]
stem = {"v6-small": "ppocrv6_small", "v6-tiny": "ppocrv6_tiny", "v5-mobile": "ppocrv5_mobile"}[variant]
if not {f"{stem}_det.onnx", f"{stem}_rec.onnx"} <= set(archives.get(url_file[:-7], [])):
    fail(where, f"model.source.url {url_file} does not hold the files of variant {variant}")
print(f"    ok   Dockerfile: stages {', '.join(stages)}; archives {', '.join(sorted(archives))}")

ignore = [l.strip() for l in open(os.path.join(ROOT, ".dockerignore")) if l.strip() and not l.startswith("#")]
for needed in ("Cargo.toml", "Cargo.lock", "runtime", "operator", "scripts", "scripts/fetch-models.sh"):
    if needed in ignore:
        fail(".dockerignore", f"excludes {needed}, which the build needs")
for needed in (".git", "target"):
    if needed not in ignore:
        fail(".dockerignore", f"does not exclude {needed}")
for image in re.search(r'^TEST_IMAGES="([^"]*)"', run_sh, re.M).group(1).split():
    if not os.path.getsize(os.path.join(ROOT, "runtime/tests/data", image)):
        fail("e2e/run.sh", f"test image runtime/tests/data/{image} is empty")
print("    ok   .dockerignore, test images")

exit_on_failures()
PYEOF

ROOT="$ROOT" KUBE_VERSIONS="$KUBE_VERSIONS" "$PY" "$WORK/check.py" || die "e2e manifests or consistency checks failed"

say "e2e OK: shell, manifests, OcrPipeline, kind config, Dockerfile and images consistent"
