"""The deployment files: Dockerfile, requirements.lock, deploy/compose.yaml, deploy/k8s/.

Nothing here needs Docker or a cluster. The manifests are parsed and the fields that matter are
checked, validated against the Kubernetes schemas kubernetes-validate bundles, and the
kustomizations rendered with kubectl. That they work is checked by running them:
tests/integration/test_manifest_probes.py (every probe against a real serve and worker).
"""

from __future__ import annotations

import importlib
import re
import shlex
import socket
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from arq.constants import health_check_key_suffix
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service import metrics
from service.apply import worker as worker_module
from service.config import Settings
from tests.support.tools import kubectl_kustomize, require_tool

# PyYAML comes with uvicorn[standard]; imported this way so mypy needs no types-PyYAML stubs.
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
K8S_VERSION = "1.30"

CONFIGMAP = "hatched-mirror-config"
SECRET = "hatched-mirror-secrets"
SERVE = "hatched-mirror-serve"
WORKER = "hatched-mirror-worker"
MIGRATE = "hatched-mirror-migrate"
IMAGE = "hatched-mirror"
SECRET_KEYS = {
    "DATABASE_URL",
    "REDIS_URL",
    "HATCHED_WEBHOOK_SECRETS",
    "MIRROR_API_TOKENS",
    "MIRROR_ADMIN_TOKENS",
    "HATCHED_API_KEY",
    "MIRROR_USER_TOKEN_SECRETS",
}
# The worker lets the batch in hand commit for this long on SIGTERM (service/apply/worker.py).
WORKER_JOB_WAIT_S = 30
# uvicorn's graceful shutdown in `hatched-mirror serve` (service/cli.py).
SERVE_GRACEFUL_S = 20

Doc = dict[str, Any]


def settings_aliases() -> set[str]:
    return {f.alias for f in Settings.model_fields.values() if f.alias}


def load_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(path: Path) -> Doc:
    (doc,) = load_docs(path)
    assert isinstance(doc, dict)
    return doc


def all_yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def kustomization(folder: Path) -> Doc:
    return load_one(folder / "kustomization.yaml")


def base_docs() -> list[Doc]:
    """The base's resources as written (no kustomize needed)."""
    docs: list[Doc] = []
    for name in kustomization(BASE)["resources"]:
        docs.extend(load_docs(BASE / name))
    return docs


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc, *, init: bool = True) -> list[Doc]:
    spec = pod_spec(workload)
    found: list[Doc] = list(spec["containers"])
    if init:
        found += spec.get("initContainers", [])
    return found


def main_container(workload: Doc) -> Doc:
    (container,) = pod_spec(workload)["containers"]
    assert isinstance(container, dict)
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- every file parses; every kustomization points at files that exist -------------------------


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("folder", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomization_references_exist(folder: Path) -> None:
    kust = kustomization(folder)
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    for entry in kust.get("resources", []):
        target = (folder / entry).resolve()
        assert target.exists(), f"{folder.name}: resource {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists()
    for patch in kust.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).exists(), patch["path"]


def test_base_lists_every_manifest_in_its_folder() -> None:
    listed = set(kustomization(BASE)["resources"])
    present = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# --- schemas --------------------------------------------------------------------------------------


def schema_checked_docs() -> Iterator[tuple[str, Doc]]:
    for doc in base_docs():
        yield f"base {doc['kind']}/{doc['metadata']['name']}", doc
    for name in kustomization(OVERLAY)["resources"]:
        path = OVERLAY / name
        if path.is_file():
            for doc in load_docs(path):
                yield f"overlay {doc['kind']}/{doc['metadata']['name']}", doc


def is_custom_resource(doc: Doc) -> bool:
    """keda.sh, monitoring.coreos.com ...: no schema in kubernetes-validate."""
    group = str(doc["apiVersion"]).rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def test_manifests_validate_against_kubernetes_schemas() -> None:
    kv: Any = importlib.import_module("kubernetes_validate")
    checked = 0
    for label, doc in schema_checked_docs():
        if is_custom_resource(doc):
            continue  # no bundled schema (KEDA): checked by hand below
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{label}: {path}: {exc.message}")
        checked += 1
    assert checked >= 12


# --- pods: security, resources, configuration -----------------------------------------------------


def test_workloads_are_the_expected_ones() -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in workloads(base_docs())}
    assert names == {("Deployment", SERVE), ("Deployment", WORKER), ("Job", MIGRATE)}


@pytest.mark.parametrize("name", [SERVE, WORKER, MIGRATE])
def test_pod_security(name: str) -> None:
    docs = base_docs()
    workload = next(d for d in workloads(docs) if d["metadata"]["name"] == name)
    spec = pod_spec(workload)
    assert spec["automountServiceAccountToken"] is False
    account = find(docs, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    pod_ctx = spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] == 10001
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault"
    tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in containers(workload):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in ctx["capabilities"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in tmp_volumes, f"{container['name']}: /tmp is not an emptyDir"


@pytest.mark.parametrize("name", [SERVE, WORKER, MIGRATE])
def test_containers_have_resources_image_and_configuration(name: str) -> None:
    workload = next(d for d in workloads(base_docs()) if d["metadata"]["name"] == name)
    for container in containers(workload):
        label = f"{name}/{container['name']}"
        resources = container["resources"]
        for part in ("requests", "limits"):
            assert set(resources[part]) >= {"cpu", "memory"}, f"{label}: {part}"
        assert container["image"] == IMAGE, label
        sources = container["envFrom"]
        assert {"configMapRef": {"name": CONFIGMAP}} in sources, label
        assert {"secretRef": {"name": SECRET}} in sources, label
        assert "env" not in container, f"{label}: settings belong in the ConfigMap or Secret"


def test_commands_pick_the_role() -> None:
    docs = base_docs()
    assert main_container(find(docs, "Deployment", SERVE))["args"][0] == "serve"
    assert main_container(find(docs, "Deployment", WORKER))["args"] == ["worker"]
    assert main_container(find(docs, "Job", MIGRATE))["args"] == ["migrate"]
    # Safety net: a new release never runs against an older schema.
    for name in (SERVE, WORKER):
        (init,) = pod_spec(find(docs, "Deployment", name))["initContainers"]
        assert init["args"] == ["migrate"]


def test_migrate_job_runs_once_and_cleans_up() -> None:
    job = find(base_docs(), "Job", MIGRATE)
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["activeDeadlineSeconds"] > 0


# --- probes and termination -----------------------------------------------------------------------


def test_serve_probes_and_termination() -> None:
    serve = find(base_docs(), "Deployment", SERVE)
    container = main_container(serve)
    # That each probe answers is checked against a running serve in
    # tests/integration/test_manifest_probes.py; here only the timing.
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod_spec(serve)["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + SERVE_GRACEFUL_S


def worker_probe_script() -> str:
    container = main_container(find(base_docs(), "Deployment", WORKER))
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["exec"]["command"] == command, probe
    script = command[2]
    assert isinstance(script, str)
    return script


def worker_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What create_worker passes to arq's Worker (not built: that would touch the event loop)."""
    captured: dict[str, Any] = {}

    def record(**kwargs: Any) -> None:
        captured.update(kwargs)

    monkeypatch.setattr(worker_module, "MirrorWorker", record)
    settings = Settings.model_validate({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    worker_module.create_worker(settings, handle_signals=False)
    assert captured, "create_worker no longer builds a MirrorWorker: update this test"
    return captured


def test_worker_probes_and_termination(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = find(base_docs(), "Deployment", WORKER)
    job_wait = worker_kwargs(monkeypatch).get("job_completion_wait", WORKER_JOB_WAIT_S)
    assert pod_spec(worker)["terminationGracePeriodSeconds"] > job_wait + 5
    compile(worker_probe_script(), "<worker probe>", "exec")


def test_worker_health_key_is_fresh_enough_for_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = worker_kwargs(monkeypatch)
    if "health_check_interval" not in kwargs:
        pytest.skip(
            "create_worker keeps arq's default health_check_interval (3600 s): "
            "the worker probe cannot tell a hung worker from a live one"
        )
    liveness = main_container(find(base_docs(), "Deployment", WORKER))["livenessProbe"]
    interval = float(kwargs["health_check_interval"])
    # A live worker rewrites the key every `interval` with a TTL of interval + 1 s, so the key
    # never lapses while its poll loop runs; a hung worker's key is gone within interval + 1 s
    # and the probe must notice that within one period.
    assert interval + 1 <= liveness["periodSeconds"]
    key = kwargs.get("health_check_key")
    queue = kwargs.get("queue_name", "hatched-mirror")
    assert key in (
        None,
        f"{queue}{health_check_key_suffix}",
        f"{queue}{health_check_key_suffix}:{socket.gethostname()}",
    )


class FakeConnectionError(Exception):
    pass


class FakeTimeoutError(Exception):
    pass


class FakeRedis:
    def __init__(self, keys: set[str] | Exception) -> None:
        self.keys = keys
        self.url = ""

    def exists(self, *names: str) -> int:
        if isinstance(self.keys, Exception):
            raise self.keys
        return sum(name in self.keys for name in names)


def run_probe(
    script: str,
    keys: set[str] | Exception,
    monkeypatch: pytest.MonkeyPatch,
    queue: str | None = None,
) -> int:
    """Run the probe script as the kubelet would, against a stand-in for redis-py."""
    fake = FakeRedis(keys)

    def from_url(url: str, **_: Any) -> FakeRedis:
        fake.url = url
        return fake

    module: Any = types.ModuleType("redis")
    module.Redis = types.SimpleNamespace(from_url=from_url)
    module.ConnectionError = FakeConnectionError
    module.TimeoutError = FakeTimeoutError
    monkeypatch.setitem(sys.modules, "redis", module)
    monkeypatch.setenv("REDIS_URL", "redis://redis.invalid:6379/0")
    if queue is None:
        monkeypatch.delenv("MIRROR_QUEUE_NAME", raising=False)
    else:
        monkeypatch.setenv("MIRROR_QUEUE_NAME", queue)
    with pytest.raises(SystemExit) as exited:
        exec(compile(script, "<worker probe>", "exec"), {"__name__": "__main__"})
    assert fake.url == "redis://redis.invalid:6379/0"
    code = exited.value.code
    assert isinstance(code, int)
    return code


def test_worker_probe_reads_arqs_health_key(monkeypatch: pytest.MonkeyPatch) -> None:
    script = worker_probe_script()
    shared = f"hatched-mirror{health_check_key_suffix}"
    own = f"{shared}:{socket.gethostname()}"
    assert run_probe(script, {shared}, monkeypatch) == 0
    assert run_probe(script, {own}, monkeypatch) == 0
    assert run_probe(script, set(), monkeypatch) == 1
    assert run_probe(script, {"other:health-check"}, monkeypatch) == 1
    assert run_probe(script, {f"q1{health_check_key_suffix}"}, monkeypatch, "q1") == 0
    assert run_probe(script, {shared}, monkeypatch, "q1") == 1
    # Redis unreachable: not the worker's fault, so no restart.
    assert run_probe(script, FakeConnectionError(), monkeypatch) == 0
    assert run_probe(script, FakeTimeoutError(), monkeypatch) == 0


def test_compose_worker_healthcheck_is_the_same_probe() -> None:
    compose = load_one(DEPLOY / "compose.yaml")
    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[3].strip() == worker_probe_script().strip()


# --- scaling and disruption -----------------------------------------------------------------------


def test_hpa_scales_serve() -> None:
    docs = base_docs()
    hpa = find(docs, "HorizontalPodAutoscaler", SERVE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        SERVE,
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in find(docs, "Deployment", SERVE)["spec"], "the HPA owns replicas"


def test_keda_scales_workers_on_backlog() -> None:
    docs = base_docs()
    scaled = find(docs, "ScaledObject", WORKER)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", WORKER)
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert set(spec["fallback"]) == {"failureThreshold", "replicas"}
    # Backlog a worker may take now: deliveries in retry backoff are left out.
    gauges = {
        family.name
        for gauge in (metrics.INBOX_PENDING, metrics.INBOX_BACKOFF, metrics.INBOX_READY_LAG)
        for family in gauge.describe()
    }
    queried: set[str] = set()
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        # KEDA's fallback only works with (and 2.14-2.16 only admit) AverageValue triggers.
        assert trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http")
        float(meta["threshold"])  # KEDA wants a string holding a number
        assert isinstance(meta["threshold"], str)
        queried |= set(re.findall(r"hatched_[a-z_]+", meta["query"]))
    assert queried == gauges
    assert "replicas" not in find(docs, "Deployment", WORKER)["spec"], "KEDA owns replicas"


def test_pdbs_select_existing_pods() -> None:
    docs = base_docs()
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    covered: set[str] = set()
    for pdb in pdbs:
        assert pdb["apiVersion"] == "policy/v1"
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            name
            for name, dep in deployments.items()
            if selects(selector, dep["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"{pdb['metadata']['name']} selects {matched}"
        covered.update(matched)
    assert covered == set(deployments)


def test_deployment_selectors_match_their_templates() -> None:
    for dep in (d for d in base_docs() if d["kind"] == "Deployment"):
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selects(selector, dep["spec"]["template"]["metadata"]["labels"])


def test_service_routes_to_serve() -> None:
    docs = base_docs()
    service = find(docs, "Service", SERVE)
    labels = find(docs, "Deployment", SERVE)["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], labels)
    worker_labels = find(docs, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    assert not selects(service["spec"]["selector"], worker_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_network_policies() -> None:
    docs = base_docs()
    labels = {
        name: find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for name in (SERVE, WORKER)
    }
    migrate_labels = find(docs, "Job", MIGRATE)["spec"]["template"]["metadata"]["labels"]
    ingress: dict[str, set[tuple[str, int]]] = {SERVE: set(), WORKER: set(), MIGRATE: set()}
    egress: set[tuple[str, int]] = set()
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        selector = spec["podSelector"]["matchLabels"]
        for rule in spec.get("ingress", []):
            ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
            for name, pod_labels in [*labels.items(), (MIGRATE, migrate_labels)]:
                if selects(selector, pod_labels):
                    ingress[name] |= ports
        for rule in spec.get("egress", []):
            egress |= {(p["protocol"], p["port"]) for p in rule["ports"]}
    metrics_port = int(find(docs, "ConfigMap", CONFIGMAP)["data"]["MIRROR_WORKER_METRICS_PORT"])
    assert ingress == {SERVE: {("TCP", 8000)}, WORKER: {("TCP", metrics_port)}, MIGRATE: set()}
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 6379), ("TCP", 443)}
    default = find(docs, "NetworkPolicy", "hatched-mirror-default")
    assert set(default["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert default["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": IMAGE}
    assert default["spec"]["ingress"] == []


def test_worker_metrics_port_matches_the_configmap() -> None:
    docs = base_docs()
    port = int(find(docs, "ConfigMap", CONFIGMAP)["data"]["MIRROR_WORKER_METRICS_PORT"])
    worker = find(docs, "Deployment", WORKER)
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in main_container(worker)[
        "ports"
    ]
    assert worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)


# --- configuration: ConfigMap and Secret ----------------------------------------------------------


def test_secret_template_has_the_keys_and_no_values() -> None:
    secret = find(base_docs(), "Secret", SECRET)
    assert "data" not in secret
    assert set(secret["stringData"]) == SECRET_KEYS
    assert all(value == "" for value in secret["stringData"].values())


def test_configmap_and_secret_cover_exactly_the_settings() -> None:
    docs = base_docs()
    config = set(find(docs, "ConfigMap", CONFIGMAP)["data"])
    secret = set(find(docs, "Secret", SECRET)["stringData"])
    known = settings_aliases()
    assert not config & secret
    assert config <= known, f"unknown variables in the ConfigMap: {config - known}"
    assert secret <= known, f"unknown variables in the Secret: {secret - known}"
    assert config | secret == known, f"settings missing from deploy/k8s: {known - config - secret}"


def test_configmap_values_are_the_service_defaults() -> None:
    data = find(base_docs(), "ConfigMap", CONFIGMAP)["data"]
    assert all(isinstance(value, str) for value in data.values()), "quote ConfigMap values"
    fields = {f.alias: name for name, f in Settings.model_fields.items() if f.alias}
    defaults = Settings.model_construct()
    configured = Settings.model_validate(data)
    for alias, value in data.items():
        name = fields[alias]
        if value == "":  # "off" or "none": the default is None or an empty list
            assert not getattr(defaults, name), alias
        else:
            assert getattr(configured, name) == getattr(defaults, name), alias


# --- the example overlay --------------------------------------------------------------------------


def test_overlay_never_writes_the_secret() -> None:
    patch = load_one(OVERLAY / "patch-delete-secret-template.yaml")
    assert patch["$patch"] == "delete"
    assert (patch["kind"], patch["metadata"]["name"]) == ("Secret", SECRET)


def test_overlay_ingress_exposes_only_the_public_routes() -> None:
    ingress = load_one(OVERLAY / "ingress.yaml")
    paths = {
        p["path"]: p["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert set(paths) == {"/webhooks/hatched", "/v1"}
    assert all(svc == {"name": SERVE, "port": {"name": "http"}} for svc in paths.values())


def test_rendered_base() -> None:
    rendered = kubectl_kustomize(BASE)
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == {
        (d["kind"], d["metadata"]["name"]) for d in base_docs()
    }


def test_rendered_overlay() -> None:
    rendered = kubectl_kustomize(OVERLAY)
    kust = kustomization(OVERLAY)
    namespace = kust["namespace"]
    (image,) = kust["images"]
    expected_image = f"{image['newName']}:{image['newTag']}"
    assert not [d for d in rendered if d["kind"] == "Secret"], "the overlay must not ship a Secret"
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    for workload in workloads(rendered):
        for container in containers(workload):
            assert container["image"] == expected_image
            # envFrom names still resolve after kustomize's renames.
            assert {"configMapRef": {"name": CONFIGMAP}} in container["envFrom"]
    config = find(rendered, "ConfigMap", CONFIGMAP)["data"]
    assert config["MIRROR_CORS_ORIGINS"]
    Settings.model_validate(config)  # every merged value still parses
    assert find(rendered, "HorizontalPodAutoscaler", SERVE)["spec"]["minReplicas"] >= 2
    # Step 2 of the upgrade in deploy/README.md applies with this selector: it must take the
    # migrate Job and the settings, and leave serve and worker for step 3.
    first = {
        (d["kind"], d["metadata"]["name"])
        for d in rendered
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        not in ("serve", "worker")
    }
    assert {("Job", MIGRATE), ("ConfigMap", CONFIGMAP)} <= first
    assert not {("Deployment", SERVE), ("Deployment", WORKER)} & first
    kv: Any = importlib.import_module("kubernetes_validate")
    for doc in rendered:
        if not is_custom_resource(doc):
            kv.validate(doc, K8S_VERSION, strict=True)


def test_overlay_network_ports_follow_its_patches() -> None:
    """The overlay sets the Postgres and Redis egress ports; the rendered policy has them, and
    the worker's metrics ingress matches the rendered MIRROR_WORKER_METRICS_PORT."""
    rendered = kubectl_kustomize(OVERLAY)
    default = find(rendered, "NetworkPolicy", "hatched-mirror-default")
    patch = next(
        p
        for p in kustomization(OVERLAY)["patches"]
        if p.get("target", {}).get("kind") == "NetworkPolicy"
    )
    for op in yaml.safe_load(patch["patch"]):
        rule = int(op["path"].split("/")[3])
        assert default["spec"]["egress"][rule]["ports"][0]["port"] == op["value"]
    port = int(find(rendered, "ConfigMap", CONFIGMAP)["data"]["MIRROR_WORKER_METRICS_PORT"])
    metrics_policy = find(rendered, "NetworkPolicy", "hatched-mirror-worker-metrics")
    assert metrics_policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]


def sync_wave(doc: Doc) -> int:
    return int(doc["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_argo_cd_runs_migrate_after_its_configuration_and_before_the_pods() -> None:
    rendered = kubectl_kustomize(OVERLAY)
    job = find(rendered, "Job", MIGRATE)
    annotations = job["metadata"]["annotations"]
    # A Sync hook honours waves; a PreSync hook would run before the ConfigMap exists.
    assert annotations["argocd.argoproj.io/hook"] == "Sync"
    assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"
    needs = [find(rendered, "ConfigMap", CONFIGMAP), find(rendered, "ServiceAccount", IMAGE)]
    needs.append(find(base_docs(), "Secret", SECRET))  # created out of band by the overlay
    assert all(sync_wave(doc) < sync_wave(job) for doc in needs)
    for name in (SERVE, WORKER):
        assert sync_wave(job) < sync_wave(find(rendered, "Deployment", name))


# --- compose --------------------------------------------------------------------------------------


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def test_compose() -> None:
    compose = load_one(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "serve", "worker"}
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name

    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    for name in ("serve", "worker"):
        service = services[name]
        assert service["command"] == [name]
        deps = service["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["build"]["context"] == ".."
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
    assert services["serve"]["ports"] == ["127.0.0.1:8000:8000"], "loopback only"
    assert seconds(services["serve"]["stop_grace_period"]) > SERVE_GRACEFUL_S
    assert seconds(services["worker"]["stop_grace_period"]) > WORKER_JOB_WAIT_S


def test_compose_environment() -> None:
    services = load_one(DEPLOY / "compose.yaml")["services"]
    known = settings_aliases()
    for name in ("migrate", "serve", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, f"{name}: {set(env) - known}"
        assert {"DATABASE_URL", "REDIS_URL"} <= set(env)
    env = services["serve"]["environment"]
    # Secrets come from the caller's environment; the fallbacks say they are for this stack only.
    for key in ("HATCHED_WEBHOOK_SECRETS", "MIRROR_API_TOKENS"):
        match = re.fullmatch(r"\$\{" + key + r":-(.*)\}", env[key])
        assert match, key
        assert re.search(r"dev.only", match.group(1)), key
    # No well-known admin token: the admin API is off unless the caller sets one.
    assert env["MIRROR_ADMIN_TOKENS"] == "${MIRROR_ADMIN_TOKENS:-}"


# --- Dockerfile, .dockerignore, requirements.lock -------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, args))
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in stage:
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    args = dict(
        a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a and " " not in a
    )
    all_stages = stages()
    assert len(all_stages) >= 2
    final = all_stages[-1]
    base = final[0][1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("python:3.11-slim"), base
    users = [a for i, a in final if i == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"
    directives = dict(final)
    assert "HEALTHCHECK" in directives
    assert "127.0.0.1:8000/healthz" in directives["HEALTHCHECK"]
    assert directives["ENTRYPOINT"] == '["hatched-mirror"]'
    assert directives["CMD"] == '["serve"]'
    assert directives["EXPOSE"] == "8000"
    assert env_of(final)["PYTHONUNBUFFERED"] == "1"
    assert any(i == "COPY" and a.startswith("--from=builder") for i, a in final)


def test_dockerfile_installs_from_the_lock_with_hashes() -> None:
    builder = stages()[0]
    runs = " ".join(a for i, a in builder if i == "RUN")
    assert re.search(r"pip install [^&]*--require-hashes -r /tmp/requirements.lock", runs)
    # The package itself: the wheel, without letting pip resolve anything else.
    assert re.search(r"pip install [^&]*--no-deps /dist/hatched_mirror-\S*\.whl", runs)
    copies = [a for i, a in builder if i == "COPY"]
    assert any(a.startswith("requirements.lock ") for a in copies)


def test_image_needs_no_sql_dir() -> None:
    """The migrations ship inside the wheel (package data `service.sql`); the image installs
    the wheel and sets no MIRROR_SQL_DIR. That the wheel really carries them and migrates from
    a fresh venv: tests/integration/test_wheel.py."""
    final = stages()[-1]
    assert "MIRROR_SQL_DIR" not in env_of(final)
    assert not [a for i, a in final if i == "COPY" and not a.startswith("--from=")]
    builder_copies = [a.split() for i, a in stages()[0] if i == "COPY"]
    assert ["sql", "./sql"] in builder_copies
    assert list((ROOT / "sql").glob("[0-9][0-9][0-9][0-9]_*.sql"))


def test_runtime_stage_drops_the_installers() -> None:
    final = stages()[-1]
    runs = " ".join(a for i, a in final if i == "RUN")
    assert re.search(r"pip uninstall --yes [^&]*pip setuptools", runs)
    builder_runs = " ".join(a for i, a in stages()[0] if i == "RUN")
    # The runtime venv, copied whole, loses its own pip and setuptools in the builder.
    assert re.search(r"/opt/venv/bin/python -m pip uninstall --yes pip setuptools", builder_runs)


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_healthcheck_commands_compile() -> None:
    healthcheck = dict(stages()[-1])["HEALTHCHECK"]
    command = healthcheck.split("CMD", 1)[1].strip()
    exec_form = yaml.safe_load(command)  # a JSON array is valid YAML
    assert exec_form[:2] == ["python", "-c"]
    compile(exec_form[2], "<HEALTHCHECK>", "exec")
    serve = load_one(DEPLOY / "compose.yaml")["services"]["serve"]["healthcheck"]["test"]
    compile(serve[3], "<compose serve healthcheck>", "exec")


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list keeps .venv, .env and .git out of the context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for stage in stages():
        for instruction, args in stage:
            if instruction == "COPY" and not args.startswith("--from"):
                for src in args.split()[:-1]:
                    assert src.rstrip("/") in allowed, src
                    assert (ROOT / src).exists(), src


def lock_requirements() -> list[str]:
    """The lock's requirement lines, continuations joined, comments dropped."""
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    lines = [raw.split("#", 1)[0].rstrip() for raw in text.splitlines()]
    joined = "\n".join(line for line in lines if line.strip()).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()]


def lock_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in lock_requirements():
        spec, *options = line.split(" --hash=")
        name, sep, version = spec.strip().partition("==")
        assert sep and version and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not pinned: {line}"
        # --require-hashes: every pin carries the sha256 of each file pip may pick.
        assert options, f"{name} has no --hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", o.strip()) for o in options), name
        pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_the_runtime_dependencies() -> None:
    pins = lock_pins()
    assert {"starlette", "uvicorn", "asyncpg", "arq", "redis", "pydantic"} <= set(pins)
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs {pins[name]}"
    extras = {
        canonicalize_name(Requirement(spec).name)
        for group in project.get("optional-dependencies", {}).values()
        for spec in group
    } - {canonicalize_name(project["name"])}
    runtime = {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    assert not (extras - runtime) & set(pins), "test/dev extras do not belong in the image"
