"""Validates deploy/k8s/*.yaml offline: every resource against Kubernetes' OpenAPI schemas
(strict: unknown fields are errors) from the pinned `kubernetes-validate` wheel, CRDs against
the small schemas vendored in deploy/k8s/schemas/. A kind with no schema at all is an error.
Also checks what the schemas cannot: readiness on /health, the database URL from a Secret, the
grace periods, and the Indexed Job's shard count against its completions. Then proves it is not
vacuous: broken copies of the manifests must fail.

usage: python3 scripts/check-k8s.py [--k8s-version 1.33.0] [FILE ...]
"""
import copy, glob, json, os, sys, tomllib
import jsonschema, yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
args = sys.argv[1:]
version = "1.33.0"
if args[:1] == ["--k8s-version"]:
    version, args = args[1], args[2:]
files = args or sorted(glob.glob(os.path.join(root, "deploy/k8s/*.yaml")))
vendored = {}
for p in glob.glob(os.path.join(root, "deploy/k8s/schemas/*.json")):
    s = json.load(open(p))
    vendored[(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"])] = s


def check(docs):
    errors = []
    for name, d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except SchemaNotFoundError:
            s = vendored.get((d.get("apiVersion"), d.get("kind")))
            if s is None:
                errors.append(f"{name}: no schema for {d.get('apiVersion')} {d.get('kind')}")
                continue
            for e in jsonschema.Draft202012Validator(s).iter_errors(d):
                errors.append(f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
    configs = [tomllib.loads(d["data"]["server.toml"]) for _, d in docs
               if d.get("kind") == "ConfigMap" and "server.toml" in d.get("data", {})]
    for name, d in docs:
        kind = d.get("kind")
        if kind == "Deployment":
            pod = d["spec"]["template"]["spec"]
            c = pod["containers"][0]
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/health":
                errors.append(f"{name}: readiness must be GET /health (503 until the models load)")
            env = {e["name"]: e for e in c.get("env", [])}
            if "secretKeyRef" not in env.get("VVLM_DB", {}).get("valueFrom", {}):
                errors.append(f"{name}: VVLM_DB must come from a Secret")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            for cfg in configs:
                sg = cfg.get("limits", {}).get("shutdown_grace_s", 30.0)
                if pre + sg >= grace:
                    errors.append(f"{name}: terminationGracePeriodSeconds {grace} must exceed "
                                  f"preStop {pre} s + shutdown_grace_s {sg}")
        if kind == "Job" and d["spec"].get("completionMode") == "Indexed":
            n = d["spec"]["completions"]
            for c in d["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if env.get("SHARDS") != str(n):
                    errors.append(f"{name}: SHARDS={env.get('SHARDS')} but completions={n}")
    return errors


docs = []
for f in files:
    for i, d in enumerate(yaml.safe_load_all(open(f))):
        if d is not None:
            meta = d.get("metadata", {})
            docs.append((f"{os.path.relpath(f, root)}#{i} {d.get('kind')}/{meta.get('name')}", d))
errors = check(docs)
for e in errors:
    print(f"FAIL {e}", file=sys.stderr)
if errors:
    sys.exit(1)


def broken(kind, edit):
    out = copy.deepcopy(docs)
    hit = False
    for _, d in out:
        if d.get("kind") == kind and not hit:
            edit(d)
            hit = True
    return out if hit else None


def first_container(d):
    return d["spec"]["template"]["spec"]["containers"][0]


mutations = {
    "an unknown field": ("Deployment", lambda d: first_container(d)["ports"][0].update(protocl="TCP")),
    "a wrong type": ("Service", lambda d: d["spec"]["ports"][0].update(port="eighty")),
    "a CRD typo": ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervl="30s")),
    "grace too short": ("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=10)),
    "shards != completions": ("Job", lambda d: d["spec"].update(completions=d["spec"].get("completions", 1) + 1) if d["spec"].get("completionMode") == "Indexed" else None),
}
if not args:
    for what, (kind, edit) in mutations.items():
        bad = broken(kind, edit)
        if bad is not None and not check(bad):
            print(f"FAIL self-test: {what} in a {kind} was not caught", file=sys.stderr)
            sys.exit(1)
print(f"[vvlm] {len(docs)} Kubernetes resources valid (Kubernetes {version}, strict)"
      + ("" if args else f"; {len(mutations)} broken copies rejected"))
