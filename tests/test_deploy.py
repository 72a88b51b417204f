"""Offline checks of the deployment files in ``deploy/``: there is no cluster, KServe or Docker engine
here, so check what those would reject, and what would make the server misbehave once deployed.

Kubernetes objects are validated against the API's own schemas (``kubernetes-validate``, strict: an
unknown field fails). KServe's objects are built into the KServe SDK's own types by
``tests/kserve_types.py``, run in the SDK's venv (``.venv-kserve``: it cannot share ours), and the
Kubernetes types they embed (containers, volumes) are validated with the same schemas. Every
``MLSERVE_*`` variable and the ConfigMap's settings file go through ``load_settings``, the server's
own reader.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents

from mlserve.cli import _parser
from mlserve.errors import SettingsError
from mlserve.metrics import Metrics
from mlserve.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
COMPOSE = DEPLOY / "compose.yaml"
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"
KSERVE_TYPES = ROOT / "tests" / "kserve_types.py"

KUBERNETES_VERSION = "1.32"
"""The oldest release whose schemas kubernetes-validate bundles: manifests valid there are valid on
every later one it knows."""

OPTIONAL_K8S = {"hpa-queue-depth.yaml"}
"""Files in deploy/k8s that are not in the base on purpose (they need extra cluster components)."""

PRESTOP_SLEEP_S = 5
"""The pause every mlserve pod takes before SIGTERM, so endpoints are gone before the drain starts."""


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def manifest_files() -> list[Path]:
    return sorted([*K8S.glob("*.yaml"), *KSERVE.glob("*.yaml")])


def kustomization() -> dict[str, Any]:
    return documents(K8S / "kustomization.yaml")[0]


def base() -> list[dict[str, Any]]:
    """Every object the base kustomization deploys."""
    return [doc for name in kustomization()["resources"] for doc in documents(K8S / name)]


def kubernetes_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every object of the Kubernetes API itself (not KServe's, not kustomize's), with its file."""
    return [
        (f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in documents(path)
        if doc["kind"] != "Kustomization"
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def runtime() -> dict[str, Any]:
    return find(documents(KSERVE / "servingruntime.yaml"), "ServingRuntime", "mlserve")


def inference_service() -> dict[str, Any]:
    return find(documents(KSERVE / "inferenceservice.yaml"), "InferenceService", "iris")


def mlserve_pods() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, mlserve container) of each way mlserve is deployed on Kubernetes."""
    deployment = find(base(), "Deployment", "mlserve")["spec"]["template"]["spec"]
    serving_runtime = runtime()["spec"]
    return {
        "deployment": (deployment, only(deployment["containers"], "mlserve")),
        "servingruntime": (serving_runtime, only(serving_runtime["containers"], "kserve-container")),
    }


def all_pods() -> dict[str, dict[str, Any]]:
    """Every pod spec this project ships: the base's Deployments and the KServe runtime."""
    deployments = [doc for doc in base() if doc["kind"] == "Deployment"]
    pods = {f"deployment/{d['metadata']['name']}": d["spec"]["template"]["spec"] for d in deployments}
    return pods | {"servingruntime/mlserve": runtime()["spec"]}


def only(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    assert [c["name"] for c in containers] == [name]
    return containers[0]


def env_vars(node: Any) -> Iterator[tuple[str, str]]:
    """Every variable set anywhere under ``node``: Kubernetes ``env`` lists (a value taken from a
    Secret stands in as a placeholder) and Compose ``environment`` maps."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from ((item["name"], str(item.get("value", "from-a-secret"))) for item in value)
            elif key == "environment" and isinstance(value, dict):
                yield from ((name, str(item)) for name, item in value.items())
            else:
                yield from env_vars(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_vars(item)


def cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_ports(container: dict[str, Any]) -> set[int | str]:
    return {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"] if "name" in p}


def container_settings(pod: dict[str, Any], container: dict[str, Any], tmp_path: Path) -> Settings:
    """The settings the server in ``container`` starts with: its environment, and the settings file
    ``MLSERVE_CONFIG`` names read from the ConfigMap mounted there (written to ``tmp_path``)."""
    env = dict(env_vars(container))
    if "MLSERVE_CONFIG" in env:
        config = Path(env["MLSERVE_CONFIG"])
        mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config.parent]
        assert len(mounts) == 1, f"MLSERVE_CONFIG: no single volume mounted at {config.parent}"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        configmap = find(base(), "ConfigMap", volume["configMap"]["name"])
        local = tmp_path / config.name
        local.write_text(configmap["data"][config.name])
        env["MLSERVE_CONFIG"] = str(local)
    return load_settings(env=env)


# --- every file parses; Kubernetes objects validate against the API schemas -----------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_is_yaml_naming_its_kind(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"]
        assert doc["kind"] == "Kustomization" or doc["metadata"]["name"]


@pytest.mark.parametrize(("label", "doc"), kubernetes_objects(), ids=[label for label, _ in kubernetes_objects()])
def test_kubernetes_objects_validate_strictly(label: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The check above would pass vacuously if the validator ignored unknown fields."""
    deployment = copy.deepcopy(find(base(), "Deployment", "mlserve"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# --- the kustomize base -------------------------------------------------------------------------


def test_kustomization_lists_every_base_file_and_nothing_else() -> None:
    listed = kustomization()["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - OPTIONAL_K8S
    assert len(listed) == len(set(listed))
    assert set(listed) == on_disk
    assert "namespace" not in kustomization()
    assert all("namespace" not in doc["metadata"] for doc in base())


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl apply -k directory`` would send to the cluster."""
    built = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@needs_kubectl
def test_kustomize_builds_the_base() -> None:
    def names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)

    assert names(kustomize(K8S)) == names(base())


@needs_kubectl
def test_queue_depth_autoscaler_patches_the_base_from_an_overlay(tmp_path: Path) -> None:
    """What hpa-queue-depth.yaml's comment tells users to do: patch it in from an overlay."""
    shutil.copy(K8S / "hpa-queue-depth.yaml", tmp_path)
    # kustomize takes a base only by a relative path.
    overlay = {"resources": [os.path.relpath(K8S, tmp_path)], "patches": [{"path": "hpa-queue-depth.yaml"}]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    metrics = find(kustomize(tmp_path), "HorizontalPodAutoscaler", "mlserve")["spec"]["metrics"]
    assert [(m["type"], m["pods"]["metric"]["name"]) for m in metrics] == [("Pods", "mlserve_queue_depth")]


def test_queue_depth_autoscaler_reads_a_metric_the_server_exports() -> None:
    metric = documents(K8S / "hpa-queue-depth.yaml")[0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in Metrics().registry.collectors


def test_references_between_objects_resolve() -> None:
    objects = base()
    deployment = find(objects, "Deployment", "mlserve")
    pod = deployment["spec"]["template"]["spec"]
    container = only(pod["containers"], "mlserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for volume in pod["volumes"]:
        if "configMap" in volume:
            find(objects, "ConfigMap", volume["configMap"]["name"])
    for var in container["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in find(objects, "Secret", ref["name"])["stringData"]
    service = find(objects, "Service", "mlserve")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", 80, "http")]
    assert "http" in container_ports(container)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in container_ports(container), probe
    assert find(objects, "PodDisruptionBudget", "mlserve")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for hpa in (find(objects, "HorizontalPodAutoscaler", "mlserve"), documents(K8S / "hpa-queue-depth.yaml")[0]):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mlserve"}
        assert hpa["spec"]["minReplicas"] >= 2 > find(objects, "PodDisruptionBudget", "mlserve")["spec"]["minAvailable"]


def test_redis_url_names_the_redis_service(tmp_path: Path) -> None:
    objects = base()
    settings = container_settings(*mlserve_pods()["deployment"], tmp_path)
    assert settings.redis_url is not None
    url = urlsplit(settings.redis_url.reveal())
    host = url.hostname or ""
    redis = find(objects, "Service", host)
    assert [p["port"] for p in redis["spec"]["ports"]] == [url.port]
    redis_pods = find(objects, "Deployment", host)["spec"]["template"]["metadata"]["labels"]
    assert redis["spec"]["selector"].items() <= redis_pods.items()
    allowed = find(objects, "NetworkPolicy", host)["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= find(objects, "Deployment", "mlserve")["spec"]["template"]["metadata"]["labels"].items()


# --- what the server inside the pods gets ---------------------------------------------------------


def test_configmap_holds_valid_settings_and_no_secrets(tmp_path: Path) -> None:
    config = tmp_path / "mlserve.toml"
    config.write_text(find(base(), "ConfigMap", "mlserve-config")["data"]["mlserve.toml"])
    settings = load_settings(str(config), env={})
    assert settings.cache.enabled
    assert settings.admin_token is None and settings.redis_url is None and settings.cache.redis_url is None


def test_deployment_starts_the_server_as_intended(tmp_path: Path) -> None:
    pod, container = mlserve_pods()["deployment"]
    settings = container_settings(pod, container, tmp_path)
    assert settings.host == "0.0.0.0"
    assert settings.port in container_ports(container)
    assert settings.admin_token is not None and settings.redis_url is not None
    assert settings.models_dir == "/app/models"
    assert settings.shutdown_timeout_s == 30
    # Drain after the preStop pause, and still finish before the kubelet's SIGKILL.
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_SLEEP_S + settings.shutdown_timeout_s
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= max(300, settings.worker_start_timeout_s)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


@pytest.mark.parametrize("deployment", mlserve_pods())
def test_one_worker_per_cpu_of_the_limit(deployment: str, tmp_path: Path) -> None:
    """``workers = 0`` would start one per core of the node, then be throttled to the limit."""
    pod, container = mlserve_pods()[deployment]
    limits = container["resources"]["limits"]
    assert container_settings(pod, container, tmp_path).workers == cores(limits["cpu"])
    assert container["resources"]["requests"] == limits


@pytest.mark.parametrize("deployment", mlserve_pods())
def test_everything_the_server_writes_is_on_a_writable_volume(deployment: str, tmp_path: Path) -> None:
    """The root filesystem is read-only, so the MLflow cache, temporary files (MLflow's downloads),
    XDG caches and, without Redis, the state file must each be on an emptyDir."""
    pod, container = mlserve_pods()[deployment]
    settings = container_settings(pod, container, tmp_path)
    scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = container["volumeMounts"]
    writable = [Path(m["mountPath"]) for m in mounts if m["name"] in scratch and not m.get("readOnly")]
    written = [settings.mlflow_cache, "/tmp", dict(env_vars(container))["XDG_CACHE_HOME"]]
    if settings.redis_url is None:
        written.append(settings.state_file)
    for path in written:
        assert any(Path(path).is_relative_to(root) for root in writable), path


@pytest.mark.parametrize("label", all_pods())
def test_pods_run_locked_down(label: str) -> None:
    pod = all_pods()[label]
    for container in pod["containers"]:
        context = pod.get("securityContext", {}) | container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "limits" in container["resources"] and "requests" in container["resources"]


def test_the_admin_token_is_a_placeholder_to_replace() -> None:
    """The shipped Secret must not look like a real token, so nobody deploys it unknowingly."""
    assert "replace" in find(base(), "Secret", "mlserve-admin")["stringData"]["token"]


# --- every MLSERVE_* variable in every deploy file is a real setting -------------------------------


def deploy_variables() -> list[tuple[str, str, str]]:
    files = sorted({*manifest_files(), COMPOSE})
    found = {(str(p.relative_to(DEPLOY)), n, v) for p in files for doc in documents(p) for n, v in env_vars(doc)}
    # MLSERVE_CONFIG is a path inside the container, checked where the settings are loaded.
    return sorted(var for var in found if var[1].startswith("MLSERVE_") and var[1] != "MLSERVE_CONFIG")


def check_setting(name: str, value: str) -> None:
    """Load ``name=value`` the way the server does: an unknown name or a bad value raises."""
    load_settings(env={name: value})


@pytest.mark.parametrize(("path", "name", "value"), deploy_variables())
def test_every_mlserve_variable_is_a_setting(path: str, name: str, value: str) -> None:
    check_setting(name, value)


def test_a_misspelled_variable_is_rejected() -> None:
    with pytest.raises(SettingsError):
        check_setting("MLSERVE_CACHE__ENABLD", "true")


# --- KServe -------------------------------------------------------------------------------------


def kserve_types(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run tests/kserve_types.py with the KServe SDK's Python. Without that venv the check is skipped
    locally but fails in CI, whose ``make test`` builds it."""
    if not KSERVE_PYTHON.exists():
        message = f"no KServe SDK venv at {KSERVE_PYTHON.relative_to(ROOT)}: run `make .venv-kserve/.installed`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [str(KSERVE_PYTHON), str(KSERVE_TYPES), *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_kserve_objects_round_trip_through_the_sdk_types() -> None:
    """Every KServe object builds into the SDK's types and serializes back unchanged: no field was
    dropped or converted on the way."""
    files = sorted(KSERVE.glob("*.yaml"))
    result = kserve_types([str(path) for path in files])
    assert result.returncode == 0, result.stderr
    expected = [doc for path in files for doc in documents(path)]
    # ModelSpec inlines a Container, whose name is not optional in KServe's Go type either: "" when unset.
    find(expected, "InferenceService", "iris")["spec"]["predictor"]["model"].setdefault("name", "")
    assert json.loads(result.stdout) == expected


def misspell(node: dict[str, Any], field: str, typo: str) -> None:
    node[typo] = node.pop(field)


SDK_REJECTS: dict[str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None], str]] = {
    "runtime-field": (
        runtime,
        lambda doc: misspell(doc["spec"], "supportedModelFormats", "supportedModelFormat"),
        "$.spec.supportedModelFormat",
    ),
    "runtime-container-field": (
        runtime,
        lambda doc: misspell(doc["spec"]["containers"][0], "readinessProbe", "readinesProbe"),
        "$.spec.containers[0].readinesProbe",
    ),
    "model-field": (
        inference_service,
        lambda doc: misspell(doc["spec"]["predictor"]["model"], "storageUri", "storageURI"),
        "$.spec.predictor.model.storageURI",
    ),
    "runtime-field-type": (
        runtime,
        lambda doc: doc["spec"].update(multiModel="false"),
        "$.spec.multiModel",
    ),
    "container-field-type": (
        runtime,
        lambda doc: doc["spec"]["containers"][0]["ports"][0].update(containerPort="8080"),
        "$.spec.containers[0].ports[0].containerPort",
    ),
}
"""Mistakes the SDK's types must catch, KServe's own fields and the Kubernetes types they embed:
(the object, how to break it, the JSON path the failure names)."""


@pytest.mark.parametrize("mistake", SDK_REJECTS)
def test_the_sdk_types_reject_a_wrong_field(mistake: str) -> None:
    """The round trip above would pass vacuously if unknown fields were ignored or values coerced."""
    load, breaks, path = SDK_REJECTS[mistake]
    doc = load()
    breaks(doc)
    result = kserve_types([], stdin=json.dumps([doc]))
    assert result.returncode == 1, result.stdout
    assert f"{path}: " in result.stderr


def kubernetes_part(node: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields of ``node`` that the Kubernetes type ``kind`` (``podspec``, ``container``) has: the
    part a KServe type inlines from it. Any other name was checked by the SDK's types above."""
    schema = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/{kind}-v1.json", KUBERNETES_VERSION
    )
    return {field: value for field, value in node.items() if field in schema["properties"]}


def validate_pod(name: str, spec: dict[str, Any]) -> None:
    """Validate ``spec`` strictly as a Pod's: the values, enums and required fields the SDK's types
    do not check."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_serving_runtime_pod_fields_are_valid() -> None:
    validate_pod("mlserve", kubernetes_part(runtime()["spec"], "podspec"))


def test_inference_service_predictor_is_valid() -> None:
    """The predictor's model is the pod's one container; the predictor inlines the rest of the PodSpec."""
    predictor = inference_service()["spec"]["predictor"]
    container = {"name": "kserve-container"} | kubernetes_part(predictor["model"], "container")
    validate_pod("iris", kubernetes_part(predictor, "podspec") | {"containers": [container]})
    assert predictor["model"]["storageUri"]


def test_serving_runtime_declares_what_mlserve_serves() -> None:
    spec = runtime()["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"sklearn", "mlflow", "pytorch"}
    for model_format in formats.values():
        assert model_format["autoSelect"] is True
    assert spec["protocolVersions"] == ["v2"]


def test_inference_service_picks_the_mlserve_runtime() -> None:
    model = inference_service()["spec"]["predictor"]["model"]
    spec = runtime()["spec"]
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]


def test_runtime_arguments_are_accepted_by_mlserve_serve() -> None:
    """KServe appends the args to the image's ``mlserve serve``, with ``{{.Name}}`` replaced by the
    InferenceService's name; argparse exits on an unknown flag."""
    pod, container = mlserve_pods()["servingruntime"]
    name = inference_service()["metadata"]["name"]
    args = _parser().parse_args(["serve", *(arg.replace("{{.Name}}", name) for arg in container["args"])])
    assert args.model == ["/mnt/models"] and args.model_name == name
    settings = load_settings(env=dict(env_vars(container)), overrides={"host": args.host, "port": args.port})
    assert settings.host == "0.0.0.0"
    assert settings.port == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["port"] == settings.port


# --- Compose and Prometheus ---------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    return documents(COMPOSE)[0]["services"]


def mlserve_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose_services().items() if "build" in service}


def test_compose_runs_two_replicas_on_one_redis() -> None:
    services = compose_services()
    assert services["redis"]["image"].startswith("redis:7")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    replicas = mlserve_services()
    assert len(replicas) == 2
    published = set()
    for service in replicas.values():
        assert (COMPOSE.parent / service["build"]["context"] / "Dockerfile").is_file()
        settings = load_settings(env=service["environment"])
        assert settings.host == "0.0.0.0"
        assert settings.redis_url is not None
        redis_host = urlsplit(settings.redis_url.reveal()).hostname or ""
        assert services[redis_host]["image"].startswith("redis:")
        assert service["depends_on"][redis_host]["condition"] == "service_healthy"
        assert "/health/ready" in " ".join(service["healthcheck"]["test"])
        assert float(service["stop_grace_period"].removesuffix("s")) > settings.shutdown_timeout_s
        published.update(port.split(":")[0] for port in service["ports"])
    assert len(published) == len(replicas)


def test_prometheus_scrapes_every_replica() -> None:
    prometheus = compose_services()["prometheus"]
    mounted = {v.split(":")[1]: COMPOSE.parent / v.split(":")[0] for v in prometheus["volumes"]}
    config = documents(mounted["/etc/prometheus/prometheus.yml"])[0]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mlserve")
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    ports = {name: load_settings(env=s["environment"]).port for name, s in mlserve_services().items()}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}
    assert job.get("metrics_path", "/metrics") == "/metrics"
