# shellcheck shell=bash
# Sourced by scripts/check-chart.sh and scripts/check-e2e.sh: the Python venv that runs their
# embedded checks and scripts/k8s_checks.py. One list of pins for both scripts, so the module
# finds the same packages in either venv.
#
#   PY=$(k8s_checks_venv "$TOOLS/venv-NAME")   # installs once; prints the venv's python
#
# The venv is (re)built when the pins change: a stamp file named after their hash marks a
# finished install. Needs python3 (with venv) and sha256sum; pip fetches from PyPI.

K8S_CHECKS_REQUIREMENTS='attrs==26.1.0
cel-python==0.5.0
google-re2==1.1.20251105
importlib_resources==7.1.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
kubernetes-validate==1.37.0
lark==1.3.1
packaging==26.4
pendulum==3.3.0
python-dateutil==4.0.0
PyYAML==6.0.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0
tzdata==2026.6'

k8s_checks_venv() { # venv directory -> prints the venv's python
  local venv=$1 stamp
  stamp=$(printf '%s' "$K8S_CHECKS_REQUIREMENTS" | sha256sum | cut -c1-16)
  if [[ -x "$venv/bin/python" && -f "$venv/.installed-$stamp" ]]; then
    echo "$venv/bin/python"
    return
  fi
  printf '==> installing kubernetes-validate, jsonschema, cel-python into %s\n' "$venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2 || { echo "FAIL: python3 -m venv $venv" >&2; return 1; }
  printf '%s\n' "$K8S_CHECKS_REQUIREMENTS" >"$venv/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$venv/requirements.txt" >&2 || { echo "FAIL: pip install into $venv" >&2; return 1; }
  touch "$venv/.installed-$stamp"
  echo "$venv/bin/python"
}
