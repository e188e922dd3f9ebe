"""The Kubernetes manifests as shipped, run for real: the example overlay rendered by
`kubectl kustomize` (its objects validated offline in tests/unit/test_deploy.py,
test_rendered_overlay), each container's command started as a `hatched-mirror` process with the
rendered ConfigMap as its environment, and every probe of every container (HTTP path and port,
or exec command) run against it the way the kubelet would, expecting success.

A probe path the app does not route, a port the command does not listen on, or an exec probe
that looks for the wrong key all fail here, where string checks of the YAML would pass.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.harness import Process, free_port, service_env
from tests.support.tools import kubectl_kustomize

yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "example"
CONFIGMAP = "hatched-mirror-config"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    return kubectl_kustomize(OVERLAY)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def workload(rendered: list[Doc], kind: str, component: str) -> Doc:
    (found,) = [
        d
        for d in rendered
        if d["kind"] == kind
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
    ]
    return found


class Pod:
    """One container of a rendered workload, as a local process: its args and environment,
    each container port mapped to a free local port."""

    def __init__(self, container: Doc, env: dict[str, str], log: Path) -> None:
        self.container = container
        self.ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
        self.names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        self.env = {
            key: str(self.ports.get(int(value), value))
            if key.endswith("_PORT") and value.isdigit()
            else value
            for key, value in env.items()
        }
        args = list(container["args"])
        for i, arg in enumerate(args[:-1]):
            if arg == "--port":
                args[i + 1] = str(self.ports[int(args[i + 1])])
            if arg == "--host":
                args[i + 1] = "127.0.0.1"
        self.process = Process(args, self.env, log)

    def local_port(self, port: int | str) -> int:
        container_port = self.names[port] if isinstance(port, str) else port
        return self.ports[container_port]

    def probe(self, probe: Doc) -> tuple[bool, str]:
        """One run of the probe, as the kubelet does it: (passed, what it saw)."""
        timeout = max(float(probe.get("timeoutSeconds", 1)), 5.0)
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://127.0.0.1:{self.local_port(get['port'])}{get.get('path', '/')}"
            try:
                response = httpx.get(url, timeout=timeout)
            except httpx.HTTPError as exc:
                return False, f"GET {url}: {exc!r}"
            return 200 <= response.status_code < 400, f"GET {url}: {response.status_code}"
        if "exec" in probe:
            command = list(probe["exec"]["command"])
            if command[0] == "python":  # the image's venv python; here the test's own
                command[0] = sys.executable
            try:
                result = subprocess.run(
                    command, env=self.env, capture_output=True, text=True, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                return False, "exec: timed out"
            return result.returncode == 0, f"exec: exit {result.returncode} {result.stderr[-500:]}"
        raise AssertionError(f"probe kind not handled by this test: {sorted(probe)}")

    def wait_for(self, name: str, probe: Doc) -> None:
        """Passes within the time the kubelet would give it (capped for the test)."""
        budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
            "failureThreshold", 3
        )
        deadline = time.monotonic() + min(budget, 90)
        while True:
            passed, seen = self.probe(probe)
            if passed:
                return
            proc = self.process.proc
            exited = proc is not None and proc.poll() is not None
            if exited or time.monotonic() > deadline:
                log = self.process.log.read_text(errors="replace")[-3000:]
                pytest.fail(f"{self.container['name']} {name} failed: {seen}\n{log}")
            time.sleep(0.5)


def environment(
    rendered: list[Doc], database_url: str, redis_url: str, queue: str
) -> dict[str, str]:
    """The rendered ConfigMap over the test's Postgres, Redis and secrets (the Secret is
    created out of band in a real cluster; here service_env plays it)."""
    (config,) = [
        d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP
    ]
    env = service_env(database_url, redis_url)
    env.update(config["data"])
    env["MIRROR_QUEUE_NAME"] = queue  # this test's own arq health key
    env["MIRROR_LOG_FORMAT"] = "json"
    return env


def run_to_completion(container: Doc, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", *container["args"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{container['name']}: {result.stdout}{result.stderr}"


@pytest.mark.timeout(240)
def test_every_probe_of_every_container_passes(
    rendered: list[Doc], migrated: str, redis_url: str, tmp_path: Path
) -> None:
    queue = f"probe-test-{os.getpid()}-{time.time_ns()}"
    env = environment(rendered, migrated, redis_url, queue)
    deployments = [d for d in rendered if d["kind"] == "Deployment"]
    assert {workload(rendered, "Deployment", c)["metadata"]["name"] for c in ("serve", "worker")}
    # The migrate Job and every init container run to completion first, as in the cluster.
    for job in (d for d in rendered if d["kind"] == "Job"):
        for container in pod_spec(job)["containers"]:
            run_to_completion(container, env)
    probed = 0
    for deployment in deployments:
        spec = pod_spec(deployment)
        for init in spec.get("initContainers", []):
            run_to_completion(init, env)
        assert not [c for c in spec["initContainers"] if any(p in c for p in PROBES)]
        for container in spec["containers"]:
            name = container["name"]
            pod = Pod(container, env, tmp_path / f"{name}.log")
            probes = {p: container[p] for p in PROBES if p in container}
            assert probes, f"{name} has no probes"
            # Teeth: before the process runs, no probe may pass.
            for kind, probe in probes.items():
                passed, seen = pod.probe(probe)
                assert not passed, f"{name} {kind} passes with nothing running: {seen}"
            pod.process.start()
            try:
                # The kubelet holds readiness and liveness until the startup probe passed.
                for kind in sorted(probes, key=lambda k: k != "startupProbe"):
                    pod.wait_for(kind, probes[kind])
                    probed += 1
            finally:
                code = pod.process.stop()
            assert code == 0, f"{name} exited {code} after SIGTERM"
    assert probed >= 6
