#!/usr/bin/env python3
"""Render, lint and schema-validate every Kubernetes manifest under deploy/.

- the Helm chart deploy/helm/aiflow with its default values and with each
  examples/*.yaml: `helm lint --strict` (helm-python-sdk, no helm binary) and a render;
- each kustomize overlay (and the base): `kubectl kustomize`;
- every rendered object against the Kubernetes OpenAPI schemas of KUBE_VERSIONS
  (kubernetes-validate, strict: unknown fields are errors).

Objects of CRDs (cert-manager Certificate, prometheus-operator ServiceMonitor) have no
schema there: they are checked for the fields flow-node depends on and counted apart.
Any lint message, validation error or warning fails the check. Needs:
  python3 -m pip install helm-python-sdk kubernetes-validate   (and kubectl for kustomize)
"""
import glob
import os
import subprocess
import sys

import helm_python as helm
import kubernetes_validate as kv
import yaml

KUBE_VERSIONS = ["1.31.0", "1.37.0"]
CRD_KINDS = {("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
ROOT = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(ROOT, "helm", "aiflow")

problems = []


def check_crd(obj, where):
    spec = obj.get("spec", {})
    if obj["kind"] == "Certificate":
        uris = spec.get("uris", [])
        if not any(u.startswith("aiflow:role:") for u in uris) or not spec.get("dnsNames"):
            problems.append(f"{where}: Certificate {obj['metadata']['name']} lacks the role URI or DNS name")
    if obj["kind"] == "ServiceMonitor":
        if not any(e.get("path") == "/metrics" for e in spec.get("endpoints", [])):
            problems.append(f"{where}: ServiceMonitor does not scrape /metrics")


def validate(docs, where):
    """Validate the objects of one render; returns (validated, crd) counts."""
    objs = [d for d in docs if d]
    if not objs:
        problems.append(f"{where}: rendered no objects")
    n = crd = 0
    for obj in objs:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in CRD_KINDS:
            check_crd(obj, where)
            crd += 1
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{where}: {name} (k8s {version}): {path}: {e.message}")
            except Exception as e:  # SchemaNotFoundError and friends: no silent skips
                problems.append(f"{where}: {name} (k8s {version}): {getattr(e, 'message', e)}")
        n += 1
    return n, crd


def helm_renders():
    chart = helm.Chart.load(CHART)
    cases = [("defaults", {})]
    for f in sorted(glob.glob(os.path.join(CHART, "examples", "*.yaml"))):
        with open(f) as fh:
            cases.append((os.path.relpath(f, ROOT), yaml.safe_load(fh)))
    for label, values in cases:
        for version in KUBE_VERSIONS:
            report = helm.lint(CHART, values or None, strict=True, kube_version=f"v{version}")
            for m in report.get("messages", []):
                problems.append(f"helm lint ({label}, k8s {version}): {m}")
            for e in report.get("errors", []):
                problems.append(f"helm lint ({label}, k8s {version}): {e}")
        rendered = chart.render(values or None, name="aiflow", namespace="aiflow", is_install=True)
        docs = []
        for path, text in sorted(rendered.items()):
            if path.endswith(".yaml"):
                docs += list(yaml.safe_load_all(text))
        yield f"helm {label}", docs


def kustomize_renders():
    base = os.path.join(ROOT, "kustomize")
    dirs = [os.path.join(base, "base")] + sorted(glob.glob(os.path.join(base, "overlays", "*")))
    for d in dirs:
        try:
            out = subprocess.run(["kubectl", "kustomize", d], capture_output=True, text=True)
        except FileNotFoundError:
            problems.append("kubectl not found: it renders the kustomize overlays (kubectl kustomize)")
            return
        if out.returncode != 0:
            problems.append(f"kubectl kustomize {d}: {out.stderr.strip()}")
            continue
        yield f"kustomize {os.path.relpath(d, ROOT)}", list(yaml.safe_load_all(out.stdout))


def main():
    total = 0
    for where, docs in list(helm_renders()) + list(kustomize_renders()):
        n, crd = validate(docs, where)
        total += n
        extra = f" + {crd} CRD objects (field checks only)" if crd else ""
        print(f"{where}: {n} objects valid for k8s {', '.join(KUBE_VERSIONS)} (strict){extra}")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"deploy: {total} objects, helm lint --strict clean, 0 warnings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
