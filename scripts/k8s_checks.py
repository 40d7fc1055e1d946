"""Offline Kubernetes checks shared by scripts/check-chart.sh and scripts/check-e2e.sh.

Both scripts write their own checks as embedded Python, run it with the Python of a venv
under ${OCR_TOOLS_DIR:-~/.cache/ocr-serving} that has the pins of the scripts' PY_REQUIREMENTS
(kubernetes-validate, jsonschema, cel-python, PyYAML; the same pins in both scripts), and
import this module from there (sys.path.insert(0, "<repository>/scripts")). It is not meant
to run on its own and needs no other package.

What it offers:

  * failure bookkeeping: fail() records and prints a failure, exit_on_failures() ends the run
    with status 1 when there was one;
  * small helpers: ident() names an object, load() reads a multi-document YAML file;
  * k8s_validate(): an object against the Kubernetes OpenAPI schemas (kubernetes-validate,
    strict: unknown fields fail);
  * validate_custom(): a custom resource against its CRD the way the API server would take it:
    served apiVersion, metadata.name, defaults of the openAPIV3Schema applied, the schema
    (converted by to_jsonschema(), unknown fields rejected as strict field validation does)
    and the x-kubernetes-validations CEL rules (cel-python; transition rules are skipped).
"""
import copy
import re
import sys

import celpy
import jsonschema
import yaml
from kubernetes_validate import utils as kv

# Every failure of this run, as "where: message"; fail() appends to it.
failures = []


def fail(where, msg):
    """Record a failure at `where` (a file, an object) and print it."""
    failures.append(f"{where}: {msg}")
    print(f"    FAIL {where}: {msg}")


def exit_on_failures():
    """Print how many failures there were and exit with status 1, if there were any."""
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)


def ident(o):
    """Kind/namespace/name of a Kubernetes object (Kind/name when it has no namespace)."""
    m = o.get("metadata") or {}
    ns = m.get("namespace")
    return f"{o.get('kind')}/{ns + '/' if ns else ''}{m.get('name')}"


def load(path):
    """The non-empty documents of a (multi-document) YAML file."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# ---- Kubernetes OpenAPI schemas
def kube_versions_label(versions):
    """"1.30.0 1.33.0" as the scripts print it: "1.30, 1.33"."""
    return ", ".join(v.rsplit(".", 1)[0] for v in versions)


def k8s_validate(where, doc, versions):
    """Validate `doc` against the Kubernetes OpenAPI schema of each of `versions` ("1.30.0",
    ...), strictly (unknown fields fail). Records the first error as a failure at `where` and
    returns whether the object passed for every version."""
    try:
        for v in versions:
            kv.validate(doc, v, strict=True)
        return True
    except kv.ValidationError as e:
        fail(where, f"Kubernetes {e.version} schema: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
    except kv.SchemaNotFoundError as e:
        fail(where, e.message)
    return False


# ---- custom resources against a CRD's openAPIV3Schema
def to_jsonschema(s):
    """A CRD's structural openAPIV3Schema `s` as a JSON Schema (draft 7) that accepts what the
    API server accepts: the x-kubernetes-* extensions and annotations (default, description,
    format, ...) are dropped, x-kubernetes-int-or-string becomes integer-or-string, nullable
    adds null, the int32/int64/uint* formats become minimum/maximum bounds, and objects that
    neither declare additionalProperties nor preserve unknown fields reject unknown fields
    (strict field validation, kubectl's default)."""
    out = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {n: to_jsonschema(p) for n, p in v.items()}
        elif k == "items":
            out[k] = to_jsonschema(v)
        elif k == "additionalProperties":
            out[k] = to_jsonschema(v) if isinstance(v, dict) else v
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [to_jsonschema(x) for x in v]
        elif k == "not":
            out[k] = to_jsonschema(v)
        elif k.startswith("x-kubernetes-") or k in ("default", "description", "nullable", "format", "example", "externalDocs"):
            continue
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    fmt = s.get("format")
    if fmt == "int32":
        out.setdefault("minimum", -2**31); out.setdefault("maximum", 2**31 - 1)
    elif fmt in ("int64",):
        out.setdefault("minimum", -2**63); out.setdefault("maximum", 2**63 - 1)
    elif fmt in ("uint", "uint32", "uint64", "uint8", "uint16"):
        out.setdefault("minimum", 0)
    # Strict field validation (kubectl's default): unknown fields are errors,
    # unless the schema keeps unknown fields.
    if s.get("type") == "object" and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema, data):
    """Fill in, in place, the `default`s of `schema` (an openAPIV3Schema) that `data` lacks,
    as the API server does before validating: through properties, additionalProperties and
    items."""
    if isinstance(data, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name not in data and "default" in prop:
                data[name] = copy.deepcopy(prop["default"])
            if name in data:
                apply_defaults(prop, data[name])
        ap = schema.get("additionalProperties")
        if isinstance(ap, dict):
            for key in data:
                if key not in (schema.get("properties") or {}):
                    apply_defaults(ap, data[key])
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for item in data:
            apply_defaults(schema["items"], item)


CEL = celpy.Environment()


def cel_rules(where, schema, data, path, counter):
    """Evaluate the x-kubernetes-validations CEL rules of `schema` and of its sub-schemas on
    `data` (`path` is data's place in the object, "" for the root). A rule that fails, does not
    evaluate, or evaluates to anything but true is a failure at `where`. Transition rules (they
    use oldSelf) are skipped. counter[0] counts the rules evaluated."""
    if data is None:
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        expr = rule["rule"]
        if "oldSelf" in expr:
            continue  # transition rules need the old object
        counter[0] += 1
        try:
            result = CEL.program(CEL.compile(expr)).evaluate({"self": celpy.json_to_cel(data)})
        except Exception as e:  # a rule that does not evaluate is a failure too
            fail(where, f"{path or '<root>'}: CEL rule {expr!r} did not evaluate: {e}")
            continue
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            fail(where, f"{path or '<root>'}: {rule.get('message', 'CEL rule failed')} ({expr})")
    if isinstance(data, dict):
        props = schema.get("properties") or {}
        for key, value in data.items():
            sub = props.get(key) or (schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None)
            if sub:
                cel_rules(where, sub, value, f"{path}.{key}" if path else key, counter)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(data):
            cel_rules(where, schema["items"], item, f"{path}[{i}]", counter)


DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_custom(where, doc, crd):
    """Validate the custom resource `doc` against `crd` (a CustomResourceDefinition): its
    apiVersion is a served version, metadata.name (and namespace) are valid, and, after the
    schema's defaults are applied, the version's openAPIV3Schema (unknown fields rejected) and
    its CEL rules hold. Failures are recorded at `where`. Returns None when the apiVersion is
    not served, else (ok, number of CEL rules evaluated), ok meaning no failure was found."""
    before = len(failures)
    group = crd["spec"]["group"]
    served = {f"{group}/{v['name']}": v for v in crd["spec"]["versions"] if v.get("served")}
    version = served.get(doc.get("apiVersion"))
    if version is None:
        fail(where, f"apiVersion {doc.get('apiVersion')} is not served by {crd['metadata']['name']} ({', '.join(served)})")
        return None
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    if not (name and len(name) <= 253 and DNS1123_SUBDOMAIN.match(name)):
        fail(where, f"metadata.name {name!r} is not a DNS subdomain")
    if crd["spec"]["scope"] == "Namespaced" and "namespace" in meta and not DNS1123_SUBDOMAIN.match(meta["namespace"]):
        fail(where, f"metadata.namespace {meta['namespace']!r} is invalid")
    schema = version["schema"]["openAPIV3Schema"]
    data = copy.deepcopy({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")})
    apply_defaults(schema, data)
    errors = sorted(jsonschema.Draft7Validator(to_jsonschema(schema)).iter_errors(data), key=lambda e: list(e.path))
    for e in errors:
        fail(where, f"CRD schema: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
    counter = [0]
    cel_rules(where, schema, data, "", counter)
    return len(failures) == before, counter[0]
