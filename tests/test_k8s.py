"""Offline validation of the KubeRay / Kubernetes manifests under k8s/ (issue 6, item 4).

- Ray custom resources (RayCluster, RayJob, RayCronJob) are checked against the v1 openAPIV3Schema
  of the CRDs in ../shared/kuberay-crds, closed: an unknown field is an error, because the API
  server would silently prune it and the setting would simply not exist.
- Standard kinds (Namespace, ConfigMap, CronJob, ServiceAccount, ...) and every object's metadata
  are walked field by field against the `kubernetes` client's models; required fields are checked
  by constructing the models.
- Project rules: S3 credentials only from the Secret raylead-s3, the kustomization lists every
  manifest, one image set and one cluster shape everywhere, consistently named job entrypoints.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "kuberay-crds"
NAMESPACE = "raylead"
S3_SECRET = "raylead-s3"
JOB_KINDS = ("embed", "index", "calibrate", "attack", "audit")
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
WORKING_DIR = "/opt/raylead"  # where k8s/Dockerfile puts jobs/; uploaded as the Ray job's working_dir

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ except the kustomization itself."""
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return [p for p in files if p.name not in ("kustomization.yaml", "kustomization.yml")]


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_Loader) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path.name}: a YAML document that is not a mapping"
    return docs


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(where, document) for every document of every manifest file."""
    out = []
    for path in manifest_files():
        for i, doc in enumerate(load_docs(path)):
            name = (doc.get("metadata") or {}).get("name", "?")
            out.append((f"{path.relative_to(K8S)}#{i} {doc.get('kind')}/{name}", doc))
    return out


MANIFESTS = all_manifests() if K8S.is_dir() else []


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(w, d) for w, d in MANIFESTS if d.get("kind") == kind]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} under k8s/, found {len(found)}"
    return copy.deepcopy(found[0])


# ----------------------------------------------------------------------------------------------
# Validator 1: Ray CRDs as closed JSON Schemas
# ----------------------------------------------------------------------------------------------

_NOT_SCHEMAS = ("enum", "required", "default", "example", "x-kubernetes-validations")


def to_json_schema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema → a JSON Schema that rejects unknown fields.

    x-kubernetes-int-or-string → type [integer, string]; x-kubernetes-preserve-unknown-fields →
    anything goes below it; nullable → null allowed; other x-kubernetes-* keys are dropped; every
    object schema that lists `properties` and has no `additionalProperties` gets
    `additionalProperties: false`, as the API server prunes (drops) fields it does not know.
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if preserve and "properties" not in node:
        return {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in _NOT_SCHEMAS:
            out[key] = value
        else:
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string") is True:
        out["type"] = ["integer", "string"]
    if node.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def _format_checker() -> Any:
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    @checker.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker


@cache
def crd_validator(kind: str) -> Any:
    from jsonschema import Draft7Validator

    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas {CRD_DIR} are missing: check out ../shared beside the repository")
    crd = yaml.load((CRD_DIR / f"ray.io_{RAY_KINDS[kind]}.yaml").read_text(encoding="utf-8"), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    return Draft7Validator(schema, format_checker=_format_checker())


def crd_errors(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: {doc.get('apiVersion')!r}, expected 'ray.io/v1'")
    for err in sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top)"
        errors.append(f"{where}: {err.message}")
    # The CRDs leave the root metadata open (the API server handles it): check it as ObjectMeta.
    if "metadata" in doc:
        model_check(doc["metadata"], "V1ObjectMeta", "metadata", errors)
    return errors


# ----------------------------------------------------------------------------------------------
# Validator 2: standard kinds against the kubernetes client's models
# ----------------------------------------------------------------------------------------------

_LIST = re.compile(r"^(?:list|List)\[(.+)\]$")
_DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")
# Quantities are strings in the models, but the API server takes numbers too (`cpu: 4`).
_QUANTITY_FIELDS = {
    ("V1ResourceRequirements", "limits"),
    ("V1ResourceRequirements", "requests"),
    ("V1VolumeResourceRequirements", "limits"),
    ("V1VolumeResourceRequirements", "requests"),
    ("V1PodSpec", "overhead"),
    ("V1EmptyDirVolumeSource", "size_limit"),
}
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$")


class _Invalid:
    """Marks a value that failed checking (its errors are already recorded)."""


INVALID = _Invalid()


def _scalar(value: Any, type_name: str, path: str, errors: list[str], quantity: bool) -> Any:
    if quantity:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(f"{path}: {value!r} is not a quantity")
            return INVALID
        if not _QUANTITY.match(str(value)):
            errors.append(f"{path}: {value!r} is not a quantity (like 500m, 4, 16Gi)")
            return INVALID
        return str(value)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "object": True,
        "datetime": isinstance(value, str) or hasattr(value, "isoformat"),
        "date": isinstance(value, str) or hasattr(value, "isoformat"),
        "bytes": isinstance(value, (str, bytes)),
    }.get(type_name)
    if ok is None:
        errors.append(f"{path}: the validator does not know the model type {type_name!r}")
        return INVALID
    if not ok:
        errors.append(f"{path}: {value!r} is not of type {type_name}")
        return INVALID
    return value


def model_check(value: Any, type_name: str, path: str, errors: list[str], quantity: bool = False) -> Any:
    """Check `value` (parsed YAML) against a kubernetes client type; return the built value or INVALID.

    Walks `openapi_types` / `attribute_map` of each model class (an unknown key is an error), then
    constructs the model from its checked fields, which reports missing required fields.
    """
    import kubernetes.client.models as k8s_models

    if value is None:  # `key: null` / `key:` means unset to the API server
        return None
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return INVALID
        items = [model_check(v, m[1], f"{path}[{i}]", errors, quantity) for i, v in enumerate(value)]
        return INVALID if any(i is INVALID for i in items) else items
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return INVALID
        entries = {}
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: key {k!r} is not a string")
                entries[k] = INVALID
            else:
                entries[k] = model_check(v, m[1] or m[2], f"{path}.{k}", errors, quantity)
        return INVALID if any(v is INVALID for v in entries.values()) else entries
    cls = getattr(k8s_models, type_name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        return _scalar(value, type_name, path, errors, quantity)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} mapping, got {type(value).__name__}")
        return INVALID
    by_key = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    kwargs = {}
    ok = True
    for key, sub in value.items():
        attr = by_key.get(key)
        if attr is None:
            errors.append(
                f"{path}: unknown field {key!r} for {type_name} (known: {', '.join(sorted(by_key))})"
            )
            ok = False
            continue
        checked = model_check(
            sub, cls.openapi_types[attr], f"{path}.{key}", errors, (type_name, attr) in _QUANTITY_FIELDS
        )
        if checked is INVALID:
            ok = False
        else:
            kwargs[attr] = checked
    if not ok:
        return INVALID
    try:
        return cls(**kwargs)  # client_side_validation: required fields must be present
    except (ValueError, TypeError) as exc:
        pydantic_errors = getattr(exc, "errors", None)  # kubernetes >= 35 models are pydantic models
        if callable(pydantic_errors):
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in pydantic_errors())
        else:  # older clients: "Invalid value for `name`, must not be `None`"
            detail = " ".join(str(exc).split())
        errors.append(f"{path}: not a valid {type_name}: {detail[:300]}")
        return INVALID


def model_class_name(api_version: str, kind: str) -> str:
    version = api_version.rsplit("/", 1)[-1]  # "batch/v1" → "v1"
    return f"{version[:1].upper()}{version[1:]}{kind}"


def standard_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes.client.models as k8s_models

    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return ["apiVersion and kind must be strings"]
    name = model_class_name(api_version, kind)
    if not hasattr(k8s_models, name):
        return [f"no kubernetes model {name} for apiVersion {api_version!r} kind {kind!r}"]
    errors: list[str] = []
    model_check(doc, name, kind, errors)
    return errors


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    errors = crd_errors(doc) if doc.get("kind") in RAY_KINDS else standard_errors(doc)
    meta = doc.get("metadata") or {}
    if not meta.get("name"):
        errors.append("metadata.name is missing")
    elif not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", meta["name"]):
        errors.append(f"metadata.name {meta['name']!r} is not a DNS-1123 label")
    if doc.get("kind") != "Namespace" and meta.get("namespace") not in (None, NAMESPACE):
        errors.append(f"metadata.namespace {meta.get('namespace')!r}: everything lives in {NAMESPACE!r}")
    return errors


# ----------------------------------------------------------------------------------------------
# Walking the manifests
# ----------------------------------------------------------------------------------------------


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: standalone and embedded in RayJobs and RayCronJobs."""
    out = [(w, d["spec"]) for w, d in of_kind("RayCluster")]
    out += [(w, d["spec"]["rayClusterSpec"]) for w, d in of_kind("RayJob")]
    out += [(w, d["spec"]["jobTemplate"]["rayClusterSpec"]) for w, d in of_kind("RayCronJob")]
    return out


def job_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayJob spec: RayJobs and the job templates of RayCronJobs."""
    out = [(w, d["spec"]) for w, d in of_kind("RayJob")]
    out += [(w, d["spec"]["jobTemplate"]) for w, d in of_kind("RayCronJob")]
    return out


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the manifests define (Ray groups, submitters, CronJob pods)."""
    for where, spec in cluster_specs():
        yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where} group {group['groupName']}", group["template"]["spec"]
    for where, spec in job_specs():
        if "submitterPodTemplate" in spec:
            yield f"{where} submitter", spec["submitterPodTemplate"]["spec"]
    for where, doc in of_kind("CronJob"):
        yield where, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for where, doc in of_kind("Job"):
        yield where, doc["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def commands() -> list[tuple[str, str]]:
    """(where, command line) for every job entrypoint and every container command."""
    out = [(w, s["entrypoint"]) for w, s in job_specs()]
    for where, pod in pod_specs():
        for c in containers(pod):
            if c.get("command") or c.get("args"):
                out.append((f"{where} {c['name']}", " ".join(c.get("command", []) + c.get("args", []))))
    return out


# ----------------------------------------------------------------------------------------------
# The manifests are valid
# ----------------------------------------------------------------------------------------------


def test_manifests_found() -> None:
    kinds = sorted({d["kind"] for _, d in MANIFESTS})
    assert {"Namespace", "ConfigMap", "RayCluster", "RayJob", "RayCronJob", "CronJob"} <= set(kinds), kinds
    assert len(of_kind("RayJob")) == len(JOB_KINDS)


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid(where: str, doc: dict[str, Any]) -> None:
    errors = manifest_errors(doc)
    assert not errors, f"{where}:\n  " + "\n  ".join(errors)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed"
)
def test_kustomize_build_is_valid() -> None:
    """What `kubectl apply -k k8s/` would send: it builds, is valid, and is all in one namespace."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.load_all(out.stdout, Loader=_Loader) if d]
    assert len(docs) == len([d for _, d in MANIFESTS if d["kind"] != "RayJob"])
    for doc in docs:
        where = f"kustomized {doc['kind']}/{doc['metadata']['name']}"
        errors = manifest_errors(doc)
        assert not errors, (where, errors)
        assert doc["kind"] != "RayJob", f"{where}: applying the folder must not start jobs"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, where


# ----------------------------------------------------------------------------------------------
# The validators catch what they must
# ----------------------------------------------------------------------------------------------


def test_crd_schema_conversion() -> None:
    schema = to_json_schema(
        {
            "type": "object",
            "properties": {
                "port": {
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "x-kubernetes-int-or-string": True,
                },
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "map": {"type": "object", "additionalProperties": {"type": "string"}},
                "opt": {"type": "string", "nullable": True},
                "type": {"type": "string", "x-kubernetes-list-type": "atomic"},
            },
            "required": ["type"],
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["port"]["type"] == ["integer", "string"]
    assert schema["properties"]["free"] == {}
    assert schema["properties"]["map"]["additionalProperties"] == {"type": "string"}
    assert schema["properties"]["opt"]["type"] == ["string", "null"]
    assert schema["properties"]["type"] == {"type": "string"}  # a property called "type" stays a property
    assert "x-kubernetes-list-type" not in str(schema)
    from jsonschema import Draft7Validator

    real = crd_validator("RayCluster").schema
    Draft7Validator.check_schema(real)  # the converted CRD is a well-formed JSON Schema
    assert "x-kubernetes-int-or-string" not in str(real)
    assert real["properties"]["spec"]["properties"]["headGroupSpec"]["additionalProperties"] is False


def test_rejects_unknown_field_in_head_group() -> None:
    rc = the("RayCluster")
    rc["spec"]["headGroupSpec"]["replicas"] = 1  # not a field of a v1 head group: pruned by the server
    errors = manifest_errors(rc)
    assert any(e.startswith("spec.headGroupSpec:") and "'replicas' was unexpected" in e for e in errors), (
        errors
    )


def test_rejects_wrong_type_in_worker_group() -> None:
    rc = the("RayCluster")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    errors = manifest_errors(rc)
    assert any(
        "workerGroupSpecs.0.replicas" in e and "'two' is not of type 'integer'" in e for e in errors
    ), errors


def test_rejects_unknown_field_in_cronjob_container() -> None:
    cj = the("CronJob")
    container = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")  # a typo the API server would drop silently
    errors = manifest_errors(cj)
    assert any("containers[0]: unknown field 'resource' for V1Container" in e for e in errors), errors


def test_rejects_missing_required_fields_in_cronjob() -> None:
    cj = the("CronJob")
    del cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["name"]
    errors = manifest_errors(cj)
    assert any("containers[0]: not a valid V1Container" in e and "name" in e for e in errors), errors
    cj = the("CronJob")
    del cj["spec"]["schedule"]
    errors = manifest_errors(cj)
    assert any(e.startswith("CronJob.spec: not a valid V1CronJobSpec") and "schedule" in e for e in errors), (
        errors
    )


def test_rejects_wrong_types_in_standard_kinds() -> None:
    cj = the("CronJob")
    cj["spec"]["suspend"] = "yes"
    cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = (
        "lots"
    )
    errors = manifest_errors(cj)
    assert any(e.startswith("CronJob.spec.suspend:") and "not of type bool" in e for e in errors), errors
    assert any("limits.cpu: 'lots' is not a quantity" in e for e in errors), errors
    ok = the("CronJob")
    ok["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 1
    assert manifest_errors(ok) == []  # numbers are quantities too


def test_rejects_unknown_fields_deep_in_embedded_pod_templates() -> None:
    job = the("RayJob", "raylead-embed")
    gpu = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    gpu["containers"][0]["envfrom"] = gpu["containers"][0].pop("envFrom")
    gpu["tolerations"][0]["operater"] = "Exists"
    errors = manifest_errors(job)
    assert any("containers.0" in e and "'envfrom' was unexpected" in e for e in errors), errors
    assert any("tolerations.0" in e and "'operater' was unexpected" in e for e in errors), errors


def test_rejects_ray_specific_mistakes() -> None:
    cron = the("RayCronJob")
    cron["spec"]["schedul"] = "@daily"
    spec = cron["spec"]["jobTemplate"]["rayClusterSpec"]
    spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # Ray start params are strings
    spec["workerGroupSpecs"][0]["maxReplicas"] = 2**31  # int32
    spec["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "8 cores"
    errors = manifest_errors(cron)
    assert any(e.startswith("spec:") and "'schedul' was unexpected" in e for e in errors), errors
    assert any("rayStartParams.num-cpus: 0 is not of type 'string'" in e for e in errors), errors
    assert any("maxReplicas" in e and "int32" in e for e in errors), errors
    assert any("limits.cpu: '8 cores' does not match" in e for e in errors), errors


def test_rejects_bad_metadata_and_wrong_api_version() -> None:
    rc = the("RayCluster")
    rc["apiVersion"] = "ray.io/v1alpha1"
    rc["metadata"]["label"] = {"a": "b"}
    rc["metadata"]["namespace"] = "default"
    errors = manifest_errors(rc)
    assert any("expected 'ray.io/v1'" in e for e in errors), errors
    assert any("metadata: unknown field 'label' for V1ObjectMeta" in e for e in errors), errors
    assert any("metadata.namespace 'default'" in e for e in errors), errors
    assert standard_errors({"apiVersion": "batch/v1", "kind": "CronJobb"})[0].startswith(
        "no kubernetes model"
    )


# ----------------------------------------------------------------------------------------------
# Credentials
# ----------------------------------------------------------------------------------------------

_CREDENTIAL_WORDS = re.compile(r"(secret|password|passwd|token|access_key|credential)", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def credential_problems(doc: dict[str, Any]) -> list[str]:
    """Ways a manifest could carry a credential in the clear (or from the wrong place)."""
    problems = []
    if doc.get("kind") == "Secret":
        problems.append(
            "a Secret manifest: create raylead-s3 with kubectl (docs/kuberay.md), never commit it"
        )
    for node in walk(doc):
        if not isinstance(node, dict):
            continue
        for env in node["env"] if isinstance(node.get("env"), list) else []:
            name = env.get("name", "")
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
            if name.startswith("AWS_") and ("value" in env or ref.get("name") != S3_SECRET):
                problems.append(f"env {name}: must come from valueFrom.secretKeyRef of Secret {S3_SECRET}")
            elif _CREDENTIAL_WORDS.search(name) and ("value" in env or not ref):
                problems.append(f"env {name}: a credential must come from a secretKeyRef")
        for src in node["envFrom"] if isinstance(node.get("envFrom"), list) else []:
            if "secretRef" in src and src["secretRef"].get("name") != S3_SECRET:
                problems.append(f"envFrom secretRef {src['secretRef'].get('name')!r}: expected {S3_SECRET}")
        if isinstance(node.get("runtimeEnvYAML"), str):
            runtime_env = yaml.safe_load(node["runtimeEnvYAML"]) or {}
            for var in runtime_env.get("env_vars") or {}:
                if var.startswith("AWS_") or _CREDENTIAL_WORDS.search(var):
                    problems.append(f"runtimeEnvYAML env_vars.{var}: a runtime env is stored in the clear")
    if doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            for node in walk(yaml.safe_load(text)):
                if isinstance(node, dict):
                    bad = [k for k in node if _CREDENTIAL_WORDS.search(str(k))]
                    problems += [f"ConfigMap {key}: credential-like key {k!r}" for k in bad]
    text = " ".join(x for x in walk(doc) if isinstance(x, str))
    if re.search(r"--s3-(key|secret)\b", text):
        problems.append("--s3-key/--s3-secret on a command line: use the AWS_* variables from the Secret")
    if _AWS_KEY_ID.search(text):
        problems.append("something that looks like an AWS access key id")
    return problems


def test_no_inline_credentials_anywhere() -> None:
    problems = {w: p for w, d in MANIFESTS if (p := credential_problems(d))}
    assert not problems, problems
    for path in [*manifest_files(), K8S / "kustomization.yaml"]:
        text = path.read_text(encoding="utf-8")
        assert not _AWS_KEY_ID.search(text), path
        assert "kind: Secret" not in text, f"{path}: no Secret manifests in the repository"


def test_credential_check_catches_inline_values() -> None:
    rc = the("RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-real-secret"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "other", "key": "id"}}},
        {
            "name": "AWS_ENDPOINT_URL",
            "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": "AWS_ENDPOINT_URL"}},
        },
    ]
    head["args"] = ["--s3-secret", "x"]
    problems = credential_problems(rc)
    assert sum(p.startswith("env AWS_") for p in problems) == 2, problems
    assert any("--s3-key/--s3-secret" in p for p in problems), problems
    assert credential_problems({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": S3_SECRET}})


def test_every_ray_pod_gets_the_s3_secret() -> None:
    """Ray workers re-read the AWS_* variables themselves, so every Ray container needs them."""
    for where, spec in cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
        for name, group in groups:
            ray = group["template"]["spec"]["containers"][0]
            refs = [s["secretRef"]["name"] for s in ray.get("envFrom", []) if "secretRef" in s]
            refs += [
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in ray.get("env", [])
                if e["name"].startswith("AWS_") and "valueFrom" in e
            ]
            assert S3_SECRET in refs, f"{where} {name}: no S3 credentials from Secret {S3_SECRET}"


# ----------------------------------------------------------------------------------------------
# Kubernetes API and network access
# ----------------------------------------------------------------------------------------------

# The label KubeRay puts on every Ray head and worker pod it creates: ray-project/kuberay,
# ray-operator/controllers/ray/utils/constant.go (RayNodeLabelKey = "ray.io/is-ray-node") and
# ray-operator/controllers/ray/common/pod.go (labelPod sets RayNodeLabelKey: "yes" on the head and
# worker pod templates, over any label of ours). The submitter Job's pods do not get it.
KUBERAY_RAY_NODE_LABELS = {"ray.io/is-ray-node": "yes"}
# The KubeRay operator's pod: app.kubernetes.io/component is "kuberay-operator" both with the Helm
# chart (helm-chart/kuberay-operator/templates/deployment.yaml) and with the kustomize install
# (ray-operator/config/manager/manager.yaml); app.kubernetes.io/name differs between the two
# ("kuberay-operator" / "kuberay"). KubeRay's own generated NetworkPolicies select the component.
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}
DASHBOARD_PORT = 8265  # Ray dashboard + job API on each head: no authentication
DASHBOARD_PORT_NAME = "dashboard"  # its containerPort name in the head template


def token_problems(spec: dict[str, Any]) -> list[str]:
    """Service-account token rules for one RayCluster spec (standalone or embedded)."""
    problems = []
    head = spec["headGroupSpec"]["template"]["spec"]
    if head.get("automountServiceAccountToken", True) is not True:
        problems.append("head: keeps its token (the autoscaler sidecar calls the Kubernetes API)")
    for group in spec.get("workerGroupSpecs", []):
        if group["template"]["spec"].get("automountServiceAccountToken") is not False:
            problems.append(f"worker group {group['groupName']}: automountServiceAccountToken must be false")
    return problems


def test_ray_workers_get_no_service_account_token() -> None:
    """Ray workers never call the Kubernetes API, so their pods mount no service-account token
    (a compromised task cannot use it). The head keeps its token: with enableInTreeAutoscaling,
    KubeRay runs the autoscaler as a sidecar container of the head pod (with a ServiceAccount
    and Role of its own), and it creates and deletes worker pods through the API."""
    specs = cluster_specs()
    assert len(specs) == 1 + len(JOB_KINDS) + 1  # the RayCluster, each RayJob, the RayCronJob
    for where, spec in specs:
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["workerGroupSpecs"], where
        problems = token_problems(spec)
        assert not problems, (where, problems)
    # the check has teeth: one copy of the spec without the setting, or a head without a token
    for where, spec in specs:
        broken = copy.deepcopy(spec)
        del broken["workerGroupSpecs"][-1]["template"]["spec"]["automountServiceAccountToken"]
        assert token_problems(broken) == [
            f"worker group {broken['workerGroupSpecs'][-1]['groupName']}: automountServiceAccountToken must be false"
        ], where
    broken = copy.deepcopy(specs[0][1])
    broken["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] = True
    broken["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] = False
    assert len(token_problems(broken)) == 2


def submitter_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """The pod templates of everything that submits to a Ray job API: each RayJob's and the
    RayCronJob's submitterPodTemplate (K8sJobMode) and the plain CronJob's pods."""
    out = [(f"{w} submitter", s.get("submitterPodTemplate") or {}) for w, s in job_specs()]
    out += [(w, d["spec"]["jobTemplate"]["spec"]["template"]) for w, d in of_kind("CronJob")]
    return out


def test_job_submitters_get_no_service_account_token() -> None:
    """A submitter pod runs `ray job submit` against the head's job API over HTTP and never calls
    the Kubernetes API, so no submitter (each RayJob's, the RayCronJob's, the CronJob's pods)
    mounts a service-account token."""
    submitters = submitter_pod_templates()
    assert len(submitters) == len(JOB_KINDS) + 1 + 1
    for where, template in submitters:
        assert template.get("spec", {}).get("automountServiceAccountToken") is False, where


def _peer_key(peer: dict[str, Any]) -> tuple[str, frozenset[tuple[str, str]]] | str:
    """(namespaces, pod labels) a NetworkPolicy peer admits, or a string describing why it is
    not one this analysis accepts (ipBlock, matchExpressions, ...)."""
    if set(peer) - {"podSelector", "namespaceSelector"}:
        return f"peer {peer}: only podSelector / namespaceSelector peers are allowed"
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    for selector in (pods, namespaces):
        if selector is not None and set(selector) - {"matchLabels"}:
            return f"peer {peer}: matchLabels only"
    if namespaces is None:
        scope = "this namespace"
    elif namespaces == {} or namespaces == {"matchLabels": {}}:
        scope = "any namespace"
    else:
        scope = f"namespaces {sorted(namespaces['matchLabels'].items())}"
    return scope, frozenset(((pods or {}).get("matchLabels") or {}).items())


def _reaches_dashboard(rule: dict[str, Any]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # no ports: every port
    for p in ports:
        port = p.get("port")
        if p.get("protocol", "TCP") != "TCP":
            continue
        if port is None or port in (DASHBOARD_PORT, DASHBOARD_PORT_NAME):
            return True
        if isinstance(port, int) and p.get("endPort") and port <= DASHBOARD_PORT <= p["endPort"]:
            return True
    return False


def policy_problems(policy: dict[str, Any], submitters: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What is wrong with the Ray pods' NetworkPolicy: it must select exactly KubeRay's Ray pods,
    restrict ingress, let the Ray pods talk to each other on every port, and let only the Ray
    pods, the submitters (each selected by all of its labels) and the KubeRay operator reach 8265."""
    problems = []
    spec = policy.get("spec") or {}
    if policy.get("metadata", {}).get("namespace") != NAMESPACE:
        problems.append(f"metadata.namespace must be {NAMESPACE!r}")
    if spec.get("podSelector") != {"matchLabels": KUBERAY_RAY_NODE_LABELS}:
        problems.append(f"podSelector {spec.get('podSelector')}: must select exactly {KUBERAY_RAY_NODE_LABELS}")
    types = spec.get("policyTypes") or []
    if "Ingress" not in types:
        problems.append("policyTypes must include Ingress (otherwise it restricts no ingress)")
    if "Egress" in types:
        problems.append("policyTypes Egress would cut the pods off from S3 and the Kubernetes API")
    ray_peer = ("this namespace", frozenset(KUBERAY_RAY_NODE_LABELS.items()))
    submitter_peers = {
        ("this namespace", frozenset((t.get("metadata") or {}).get("labels", {}).items())) for _, t in submitters
    }
    allowed = {ray_peer, ("any namespace", frozenset(KUBERAY_OPERATOR_LABELS.items())), *submitter_peers}
    dashboard_peers = set()
    all_ports_peers = set()
    for i, rule in enumerate(spec.get("ingress") or []):
        if not rule.get("from"):
            problems.append(f"ingress[{i}]: no `from` admits every source")
            continue
        keys = [_peer_key(peer) for peer in rule["from"]]
        problems += [f"ingress[{i}]: {k}" for k in keys if isinstance(k, str)]
        keys = [k for k in keys if not isinstance(k, str)]
        if _reaches_dashboard(rule):
            dashboard_peers.update(keys)
        if not rule.get("ports"):
            all_ports_peers.update(keys)
    for peer in sorted(dashboard_peers - allowed, key=str):
        problems.append(f"port {DASHBOARD_PORT} reachable from an unexpected source: {peer}")
    for peer in sorted(allowed - dashboard_peers, key=str):
        problems.append(f"port {DASHBOARD_PORT} not reachable from {peer}")
    if all_ports_peers != {ray_peer}:
        problems.append(f"all ports must be open to the Ray pods only, not {sorted(all_ports_peers, key=str)}")
    for where, template in submitters:
        labels = (template.get("metadata") or {}).get("labels") or {}
        if not labels:
            problems.append(f"{where}: a submitter pod template without labels cannot be let in")
        if any(k.startswith("ray.io/") for k in labels):
            problems.append(f"{where}: a submitter must not carry KubeRay's ray.io/ labels")
    return problems


def test_network_policy_guards_the_ray_dashboard() -> None:
    """The dashboard / job API (8265) has no authentication: only the Ray pods, the job submitters
    and the KubeRay operator may reach it, and only Ray pods reach the other Ray ports."""
    (policy,) = [d for _, d in of_kind("NetworkPolicy")]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert policy["spec"]["podSelector"] == {"matchLabels": KUBERAY_RAY_NODE_LABELS}
    assert "Ingress" in policy["spec"]["policyTypes"]
    submitters = submitter_pod_templates()
    assert len(submitters) == len(JOB_KINDS) + 1 + 1  # each RayJob, the RayCronJob, the CronJob
    problems = policy_problems(policy, submitters)
    assert not problems, problems
    # the dashboard port the policy opens is the head's dashboard port
    for where, spec in cluster_specs():
        ports = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"name": DASHBOARD_PORT_NAME, "containerPort": DASHBOARD_PORT} in ports, where
    # nothing of ours but the Ray pods KubeRay creates carries KubeRay's Ray-node label
    for where, doc in MANIFESTS:
        for node in walk(doc):
            if isinstance(node, dict) and isinstance(node.get("labels"), dict):
                assert not set(node["labels"]) & set(KUBERAY_RAY_NODE_LABELS), where


def test_network_policy_check_catches_openings() -> None:
    policy = the("NetworkPolicy")
    submitters = submitter_pod_templates()

    def problems_after(change: Any) -> list[str]:
        broken = copy.deepcopy(policy)
        change(broken["spec"])
        return policy_problems(broken, submitters)

    def everyone_on_8265(spec: dict[str, Any]) -> None:
        spec["ingress"].append({"ports": [{"port": DASHBOARD_PORT}]})

    assert any("no `from` admits every source" in p for p in problems_after(everyone_on_8265))

    def whole_namespace(spec: dict[str, Any]) -> None:
        spec["ingress"][1]["from"].append({"podSelector": {}})

    assert any("unexpected source" in p for p in problems_after(whole_namespace))

    def named_port_from_anywhere(spec: dict[str, Any]) -> None:
        spec["ingress"].append(
            {"from": [{"namespaceSelector": {}}], "ports": [{"port": DASHBOARD_PORT_NAME}]}
        )

    assert any("unexpected source" in p for p in problems_after(named_port_from_anywhere))

    def ip_block(spec: dict[str, Any]) -> None:
        spec["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})

    assert any("ipBlock" in p for p in problems_after(ip_block))

    def all_ports_to_submitters(spec: dict[str, Any]) -> None:
        for rule in spec["ingress"]:
            if any("podSelector" in peer and "namespaceSelector" not in peer for peer in rule["from"]):
                rule.pop("ports", None)

    assert any("all ports must be open to the Ray pods only" in p for p in problems_after(all_ports_to_submitters))

    def selects_every_pod(spec: dict[str, Any]) -> None:
        spec["podSelector"] = {}
        spec["policyTypes"] = ["Egress"]

    problems = problems_after(selects_every_pod)
    assert any(p.startswith("podSelector {}") for p in problems), problems
    assert any("must include Ingress" in p for p in problems), problems
    assert any("Egress would cut" in p for p in problems), problems

    def no_operator(spec: dict[str, Any]) -> None:
        spec["ingress"] = [r for r in spec["ingress"] if "namespaceSelector" not in r["from"][0]]

    assert any("not reachable from ('any namespace'" in p for p in problems_after(no_operator))
    wrong_ns = copy.deepcopy(policy)
    wrong_ns["metadata"]["namespace"] = "default"
    assert "metadata.namespace must be 'raylead'" in policy_problems(wrong_ns, submitters)
    # a RayJob whose submitter lost its labels is locked out
    unlabelled = copy.deepcopy(submitters)
    unlabelled[0][1].pop("metadata")
    problems = policy_problems(policy, unlabelled)
    assert any("without labels" in p for p in problems), problems
    # and the model validator walks NetworkPolicies field by field
    typo = the("NetworkPolicy")
    typo["spec"]["ingress"][0]["form"] = typo["spec"]["ingress"][0].pop("from")
    errors = manifest_errors(typo)
    assert any("unknown field 'form' for V1NetworkPolicyIngressRule" in e for e in errors), errors


# ----------------------------------------------------------------------------------------------
# Consistency
# ----------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    """Every manifest is in the kustomization, except the RayJobs: creating a RayJob starts it,
    so `kubectl apply -k k8s/` must not create them (they run one by one, `kubectl create -f`)."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource listed twice"
    on_disk = {str(p.relative_to(K8S)) for p in manifest_files()}
    on_demand = {f for f in on_disk if all(d["kind"] == "RayJob" for d in load_docs(K8S / f))}
    assert on_demand == {f"rayjob-{kind}.yaml" for kind in JOB_KINDS}
    expected = on_disk - on_demand
    assert set(listed) == expected, {
        "not listed": expected - set(listed),
        "unexpected": set(listed) - expected,
    }
    (ns,) = [d for _, d in of_kind("Namespace")]
    assert ns["metadata"]["name"] == NAMESPACE


def test_one_image_set_everywhere() -> None:
    """Head, each worker group, submitters and CronJob pods use the same images in every manifest."""
    images: dict[str, set[str]] = {}
    for _, spec in cluster_specs():
        images.setdefault("head", set()).add(
            spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        )
        for group in spec["workerGroupSpecs"]:
            images.setdefault(group["groupName"], set()).add(
                group["template"]["spec"]["containers"][0]["image"]
            )
    for _, spec in job_specs():
        images["head"].update(c["image"] for c in spec["submitterPodTemplate"]["spec"]["containers"])
    for _, doc in of_kind("CronJob"):
        images["head"].update(
            c["image"] for c in containers(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        )
    assert all(len(v) == 1 for v in images.values()), images
    head, cpu, gpu = images["head"].pop(), images["cpu"].pop(), images["gpu"].pop()
    assert cpu == head
    assert gpu == f"{head}-gpu", "the GPU image is the CPU image's tag + '-gpu' (k8s/Dockerfile)"
    versions = {spec["rayVersion"] for _, spec in cluster_specs()}
    assert len(versions) == 1, versions


def test_embedded_cluster_specs_match_the_standalone_one() -> None:
    """kustomize cannot share a spec embedded in RayJobs, so the copies are kept identical by this test."""
    (reference,) = [spec for where, spec in cluster_specs() if " RayCluster/" in where]
    for where, spec in cluster_specs():
        assert spec == reference, f"{where}: its rayClusterSpec differs from raycluster.yaml's spec"


def test_cluster_shape() -> None:
    for where, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True, where
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}, where
        for name, g in groups.items():
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], (where, name)
            assert g["maxReplicas"] > 0, (where, name)
        gpu_pod = groups["gpu"]["template"]["spec"]
        assert str(gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1", where
        assert any(t.get("key") == "nvidia.com/gpu" for t in gpu_pod.get("tolerations", [])), where
        for pod in (spec["headGroupSpec"]["template"]["spec"], groups["cpu"]["template"]["spec"]):
            assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"]), where


def test_pods_are_bounded_and_unprivileged() -> None:
    for where, pod in pod_specs():
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        for c in containers(pod):
            sc = c.get("securityContext", {})
            assert sc.get("privileged") is not True and sc.get("allowPrivilegeEscalation") is False, (
                where,
                c["name"],
            )
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), (
                    where,
                    c["name"],
                    part,
                )
    for where, spec in cluster_specs():
        auto = spec["autoscalerOptions"]
        assert {"requests", "limits"} <= set(auto["resources"]), where
        assert auto["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_ray_jobs_clean_up_after_themselves() -> None:
    for where, spec in job_specs():
        assert spec["shutdownAfterJobFinishes"] is True, where
        assert spec["ttlSecondsAfterFinished"] > 0, where
        assert spec["activeDeadlineSeconds"] > 0, where
        assert "backoffLimit" in spec, where
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", (
            f"{where}: working_dir upload needs it"
        )
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == WORKING_DIR, where
        if "jobs/audit.py" in spec["entrypoint"]:
            assert spec["backoffLimit"] == 0, f"{where}: a re-run would hide the audit verdict"


def test_exactly_one_nightly_schedule_is_active() -> None:
    active = [w for w, d in of_kind("RayCronJob") + of_kind("CronJob") if not d["spec"].get("suspend", False)]
    assert len(active) == 1, active
    (cron,) = [d for _, d in of_kind("CronJob")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0


def test_cronjob_submits_to_the_long_lived_cluster() -> None:
    (rc,) = [d for _, d in of_kind("RayCluster")]
    (cron,) = [d for _, d in of_kind("CronJob")]
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["ray", "job", "submit"]
    address = command[command.index("--address") + 1]
    assert address == f"http://{rc['metadata']['name']}-head-svc:8265", (
        "KubeRay names the head Service <cluster>-head-svc"
    )
    assert command[command.index("--working-dir") + 1] == WORKING_DIR


_ENTRYPOINT = re.compile(
    r"python\s+jobs/(?P<kind>[a-z_]+)\.py\s+--config\s+/config/(?P<config>[a-z0-9_.-]+\.yaml)"
)


def test_entrypoints_are_named_consistently() -> None:
    (cm,) = [d for _, d in of_kind("ConfigMap")]
    config_keys = set(cm["data"])
    seen = set()
    for where, line in commands():
        if "jobs/" not in line:
            continue
        m = _ENTRYPOINT.search(line)
        assert m, f"{where}: {line!r} is not `python jobs/<kind>.py --config /config/<name>.yaml`"
        assert m["kind"] in JOB_KINDS, f"{where}: jobs/{m['kind']}.py is not one of {JOB_KINDS}"
        assert m["config"].startswith(m["kind"]), f"{where}: jobs/{m['kind']}.py reads /config/{m['config']}"
        assert m["config"] in config_keys, (
            f"{where}: /config/{m['config']} is not a key of ConfigMap {cm['metadata']['name']}"
        )
        seen.add(m["kind"])
    assert seen == set(JOB_KINDS)
    for path in K8S.glob("rayjob-*.yaml"):
        kind = path.stem.removeprefix("rayjob-")
        (doc,) = load_docs(path)
        assert doc["spec"]["entrypoint"] == f"python jobs/{kind}.py --config /config/{kind}.yaml", path.name
        assert doc["metadata"]["name"] == f"raylead-{kind}", path.name
    # Every Ray pod mounts the ConfigMap at /config (the driver runs on the head).
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        (volume,) = [
            v for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
        ]
        mounts = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
        assert [m["mountPath"] for m in mounts] == ["/config"], where


def test_example_configs_are_yaml_with_object_storage_uris() -> None:
    (cm,) = [d for _, d in of_kind("ConfigMap")]
    for key, text in cm["data"].items():
        config = yaml.safe_load(text)
        assert isinstance(config, dict) and config, key
        assert any(isinstance(v, str) and v.startswith("s3://") for v in config.values()), key
    pending = yaml.safe_load(cm["data"]["audit-pending.yaml"])
    assert pending["mode"] == "pending" and pending["checkpoints"].startswith("s3://")


def test_dockerfile_matches_the_manifests() -> None:
    dockerfile = (K8S / "Dockerfile").read_text(encoding="utf-8")
    (version,) = {spec["rayVersion"] for _, spec in cluster_specs()}
    bases = set(re.findall(r"rayproject/ray:([0-9.]+)-py\d+", dockerfile))
    assert bases == {version}, (
        f"k8s/Dockerfile builds on Ray {bases}, the manifests declare rayVersion {version}"
    )
    assert f"RAY_VERSION={version}" in dockerfile
    assert f"COPY --chown=1000:100 jobs {WORKING_DIR}/jobs" in dockerfile


def test_entrypoints_exist() -> None:
    """The job scripts the manifests run are in the repository."""
    jobs = REPO / "jobs"
    referenced = {m["kind"] for _, line in commands() if (m := _ENTRYPOINT.search(line))}
    missing = sorted(f"jobs/{kind}.py" for kind in referenced if not (jobs / f"{kind}.py").is_file())
    assert not missing, f"the manifests run {missing}, which do not exist"
    assert referenced == set(JOB_KINDS)


def _job_module(kind: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"raylead_job_{kind}", REPO / "jobs" / f"{kind}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate_job_config(kind: str, data: Any, where: str) -> Any:
    """Build the config objects `python jobs/<kind>.py --config` builds (no storage is touched)."""
    from raylead.audit import AuditConfig
    from raylead.config import from_mapping
    from raylead.embed import EmbedConfig

    module = _job_module(kind)
    transform = getattr(module, "from_yaml", None)
    if transform is not None:
        data = transform(data)
    if kind == "embed":
        return from_mapping(EmbedConfig, data, where)
    if kind == "audit":
        return from_mapping(AuditConfig, data, where)
    if kind == "index":
        from raylead.index import IndexBuildConfig

        job = from_mapping(module.IndexJob, data, where)
        return from_mapping(IndexBuildConfig, job.options, where)
    if kind == "calibrate":
        from raylead.attacks.calibrate import CalibrateConfig

        return from_mapping(CalibrateConfig, data, where)
    assert kind == "attack", kind
    from raylead.attacks import idiap, tinsley, webster

    job = from_mapping(module.AttackJob, data, where)
    classes = {"idiap": idiap.IdiapConfig, "tinsley": tinsley.TinsleyConfig, "webster": webster.WebsterConfig}
    return from_mapping(classes[job.attack], job.options, where)


def test_configmap_configs_validate_against_the_job_configs() -> None:
    """Each example config in the ConfigMap is accepted by the config objects of the job that
    reads it (the same ones as the CLI): an unknown key or a bad value fails here, not at 02:00."""
    from raylead.errors import ConfigError

    (cm,) = [d for _, d in of_kind("ConfigMap")]
    checked = set()
    for key, text in cm["data"].items():
        kind = key.removesuffix(".yaml").split("-")[0]
        assert kind in JOB_KINDS, key
        validate_job_config(kind, yaml.safe_load(text), f"ConfigMap key {key}")
        checked.add(kind)
    assert checked == set(JOB_KINDS)
    run = validate_job_config("audit", yaml.safe_load(cm["data"]["audit.yaml"]), "audit.yaml")
    pending = validate_job_config("audit", yaml.safe_load(cm["data"]["audit-pending.yaml"]), "audit-pending.yaml")
    assert (run.mode, pending.mode) == ("run", "pending") and pending.checkpoints.startswith("s3://")
    # the check has teeth: a misspelt key or a bad generator is refused
    bad = yaml.safe_load(cm["data"]["audit-pending.yaml"]) | {"sampels": 10}
    with pytest.raises(ConfigError, match="sampels"):
        validate_job_config("audit", bad, "bad")
    bad = yaml.safe_load(cm["data"]["audit-pending.yaml"]) | {"generator": "stylegan9"}
    with pytest.raises(ConfigError, match="unknown generator"):
        validate_job_config("audit", bad, "bad")


def test_docs_cover_the_manifests() -> None:
    docs = (REPO / "docs" / "kuberay.md").read_text(encoding="utf-8")
    assert "# Run on KubeRay" in docs
    for needed in (
        "kubectl create secret generic raylead-s3",
        "kubectl apply -k k8s/",
        "RayCronJob` feature gate",
        "ghcr.io/your-org/raylead:0.1.0",
        "k8s/Dockerfile",
    ):
        assert needed in docs, f"docs/kuberay.md does not mention {needed!r}"
    for path in manifest_files():
        assert path.name in docs, f"docs/kuberay.md does not mention k8s/{path.name}"
    assert "feature gate" in (K8S / "raycronjob-audit.yaml").read_text(encoding="utf-8")
