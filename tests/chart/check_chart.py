"""Renders, lints and validates helm/safemode for tests/it/chart.rs.

Helm's own engine does the work (the PyPI package helm-python-sdk binds
Helm's Go SDK: no helm binary), and kubernetes-validate checks every rendered
object against the Kubernetes OpenAPI schema in strict mode (unknown fields
are errors). This script only gathers: it reads one JSON request on stdin
and prints one JSON answer on stdout; the Rust test decides what passes.

Request:
    {"chart": DIR, "release": NAME, "namespace": NS, "kube_versions": ["1.29", ...],
     "renders": {CASE: {"files": [VALUES.yaml, ...], "set": {...}}},
     "rejects": {CASE: {"files": [...], "set": {...}}}}

Answer:
    {"helm_sdk": VERSION, "kube_schemas": [VERSION, ...],
     "renders": {CASE: {"lint": {KUBE: [MESSAGE, ...]}, "notes": TEXT,
                        "objects": [OBJECT, ...], "validated": {KUBE: ["Kind/name", ...]},
                        "invalid": ["KUBE Kind/name: ERROR", ...],
                        "no_schema": ["Kind/name", ...]}},
     "rejects": {CASE: {"render_error": TEXT or null, "lint": {KUBE: [MESSAGE, ...]}}}}

A lint message is "SEVERITY PATH: TEXT", SEVERITY one of info, warning, error.
"""

import json
import sys

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import yaml

helm.disable_logging()

SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


def merged(case):
    """The values of a case: its files in order, then "set", merged as Helm merges -f files."""
    values = {}
    for path in case.get("files", []):
        with open(path, encoding="utf-8") as f:
            deep_merge(values, yaml.safe_load(f) or {})
    deep_merge(values, case.get("set", {}))
    return values


def deep_merge(into, update):
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def lint(request, values):
    """Helm's lint in strict mode (warnings are errors) for each Kubernetes version."""
    answers = {}
    for kube in request["kube_versions"]:
        report = helm.lint(request["chart"], values, strict=True, namespace=request["namespace"],
                           kube_version=f"v{kube}.0")
        messages = [f"{SEVERITY.get(m['severity'], m['severity'])} {m['path']}: {m['error']}"
                    for m in report["messages"]]
        messages += [f"error: {e}" for e in report.get("errors") or []]
        answers[kube] = messages
    return answers


def render(chart, request, values):
    return chart.render(values, name=request["release"], namespace=request["namespace"],
                        is_install=True)


def main():
    request = json.load(sys.stdin)
    answer = {
        "helm_sdk": helm.helm_sdk_version(),
        "kube_schemas": kubernetes_validate.utils.all_versions(),
        "renders": {},
        "rejects": {},
    }
    with helm.Chart.load(request["chart"]) as chart:
        for name, case in request["renders"].items():
            values = merged(case)
            out = {"lint": lint(request, values), "notes": "", "objects": [],
                   "validated": {}, "invalid": [], "no_schema": []}
            for template, text in sorted(render(chart, request, values).items()):
                if template.endswith("NOTES.txt"):
                    out["notes"] = text
                    continue
                for obj in yaml.safe_load_all(text):
                    if obj:
                        out["objects"].append({"template": template, "object": obj})
            for kube in request["kube_versions"]:
                out["validated"][kube] = []
                for item in out["objects"]:
                    obj = item["object"]
                    who = f"{obj['kind']}/{obj['metadata']['name']}"
                    try:
                        kubernetes_validate.utils.validate(obj, kube, strict=True)
                        out["validated"][kube].append(who)
                    except kubernetes_validate.utils.SchemaNotFoundError:
                        if who not in out["no_schema"]:
                            out["no_schema"].append(who)
                    except kubernetes_validate.utils.ValidationError as e:
                        path = ".".join(str(p) for p in e.path)
                        out["invalid"].append(f"{kube} {who}: {path}: {e.message}")
            answer["renders"][name] = out
        for name, case in request["rejects"].items():
            values = merged(case)
            try:
                render(chart, request, values)
                error = None
            except helm.HelmError as e:
                error = str(e)
            answer["rejects"][name] = {"render_error": error, "lint": lint(request, values)}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
