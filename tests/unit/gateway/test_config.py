"""Configuration: YAML plus environment overrides; a broken file stops start-up naming the bad field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from blendgate.gateway.cli import app as cli
from blendgate.gateway.config import ConfigError, LitellmModelConfig, LocalModelConfig, load_settings
from support import REPO
from typer.testing import CliRunner


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "blendgate.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_the_embedded_model() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct"]
    assert settings.models[0].path is None and settings.api_keys == []
    assert settings.metrics.tenant_label == "drop"  # /metrics is open: no tenant named unless chosen


def test_yaml_models_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, """
port: 9000
models:
  - name: local-small
    backend: local
    dtype: bfloat16
  - name: gpt
    backend: litellm
    litellm_model: openai/gpt-4o-mini
    api_key_env: MY_OPENAI_KEY
api_keys:
  - key_env: CLIENT_KEY
    tenant: acme
""")
    monkeypatch.setenv("CLIENT_KEY", "sk-client-12345678")
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-upstream")
    monkeypatch.setenv("BLENDGATE_PORT", "9100")
    settings = load_settings(config)
    assert settings.port == 9100  # environment beats the file
    assert load_settings(config, port=9200).port == 9200  # explicit flags beat the environment
    local, gpt = settings.models
    assert isinstance(local, LocalModelConfig) and local.dtype == "bfloat16"
    assert isinstance(gpt, LitellmModelConfig) and gpt.api_key() == "sk-upstream"
    assert settings.tenants_by_key() == {"sk-client-12345678": "acme"}


@pytest.mark.parametrize(
    "text, named",
    [
        ("prot: 8000\n", "prot: unknown setting"),
        ("port: eighty\n", "port:"),
        ("models:\n  - name: m\n    backend: local\n    dtype: float8\n", "models.0.local.dtype"),
        ("models:\n  - name: m\n    backend: local\n    path: /no/such/model.gguf\n", "no such file"),
        ("models:\n  - name: m\n    backend: litellm\n", "litellm_model"),
        ("models:\n  - name: m\n    backend: teleport\n", "models.0"),
        ("models:\n  - {name: a}\n  - {name: a}\n", "repeated: a"),
        ("models: []\n", "at least one model"),
        ("api_keys:\n  - key_env: SURELY_UNSET_VAR_42\n    tenant: t\n", "SURELY_UNSET_VAR_42"),
        ("api_keys:\n  - key: short\n    tenant: t\n", "api_keys.0.key"),
        ("api_keys:\n  - key: short\n    tenant: t\n", "at least 8 characters long, this one has 5"),
        ("admin_key: s3cret\n", "admin_key: Value error, a key must be at least 8 characters long"),
        ("models:\n  - name: m\n    backend: sglang\n", "models.0.sglang.workers"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [gpu-1:30000]\n", "must be an http"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1, http://a:1/]\n", "listed twice"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1]\n    tokenizer_path: /no/such\n",
         "no such file"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1]\n    recompute_ratio: 2\n",
         "models.0.sglang.recompute_ratio"),
        ("chunk_cache:\n  selection:\n    score: loudness\n", "chunk_cache.selection.score"),
        ("chunk_cache:\n  selection:\n    probe_weights: int4\n", "chunk_cache.selection.probe_weights"),
        ("chunk_cache:\n  context_documents: 9\n", "chunk_cache.context_documents"),
        ("chunk_cache:\n  pass_cost_tokens: -1\n", "chunk_cache.pass_cost_tokens"),
        ("chunk_cache:\n  pass_cost_tokens: .nan\n", "chunk_cache.pass_cost_tokens"),
        ("chunk_cache:\n  pass_cost_tokens: measured\n", "chunk_cache.pass_cost_tokens"),
        ("chunk_cache:\n  placement_cost_tokens: -1\n", "chunk_cache.placement_cost_tokens"),
        ("chunk_cache:\n  fidelity_target: 0\n", "chunk_cache.fidelity_target"),
        ("chunk_cache:\n  redis:\n    url: cache:6379\n", "chunk_cache.redis.url"),
        ("chunk_cache:\n  redis:\n    budget_bytes: 0\n", "chunk_cache.redis.budget_bytes"),
        ("chunk_cache:\n  redis:\n    adapt: sometimes\n", "chunk_cache.redis.adapt"),
        ("metrics:\n  tenant_label: plain\n", "metrics.tenant_label"),
        ("port: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_broken_config_names_the_field(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert named in str(raised.value)


def test_serve_refuses_a_broken_config_at_start_up(tmp_path: Path) -> None:
    config = write(tmp_path, "models:\n  - name: m\n    backend: local\n    device: tpu\n")
    result = subprocess.run([sys.executable, "-m", "blendgate.gateway", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "models.0.local.device" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "blendgate.gateway", "serve", "--config", "/no/such.yaml"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_check_config_hides_keys(tmp_path: Path) -> None:
    config = write(tmp_path, "api_keys:\n  - key: sk-secret-123456\n    tenant: t\n")
    result = subprocess.run([sys.executable, "-m", "blendgate.gateway", "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sk-secret" not in result.stdout and '"tenant": "t"' in result.stdout
    config = write(tmp_path, "admin_key: admin-secret-123456\nsemantic_cache:\n  redis_url: redis://:pw-secret@h:6379/0\n")
    result = subprocess.run([sys.executable, "-m", "blendgate.gateway", "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "admin-secret" not in result.stdout and "pw-secret" not in result.stdout
    assert "redis://:***@h" in result.stdout


def test_the_example_config_is_valid() -> None:
    example = REPO / "deploy" / "blendgate.example.yaml"
    settings = load_settings(example)
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct"]


# A secret inside a URL, in each shape a configuration holds one, and the URL as shown with it hidden.
URL_SECRETS = [
    ("redis://h:6379/0?password=S3CRET", "redis://h:6379/0?password=***"),
    ("redis://:p@ss-S3CRET@h:6379/0", "redis://:***@h:6379/0"),  # an unescaped @ in the password
    ("rediss://default:S3CRET@h:6380/0?ssl_cert_reqs=none", "rediss://default:***@h:6380/0?ssl_cert_reqs=none"),
    ("redis://user:S3CRET/x?y#z@h:6379/0", "redis://***@h:6379/0"),  # unescaped reserved characters
    ("https://llm.example.com/v1?api_key=S3CRET&api-version=2024-06-01",
     "https://llm.example.com/v1?api_key=***&api-version=2024-06-01"),
    ("https://llm.example.com/v1?apiKey=S3CRET", "https://llm.example.com/v1?apiKey=***"),
    ("https://llm.example.com/v1?x-api-key=S3CRET&sig=S3CRET#access_token=S3CRET",
     "https://llm.example.com/v1?x-api-key=***&sig=***#access_token=***"),
    ("https://S3CRET@llm.example.com/v1", "https://***@llm.example.com/v1"),  # a token as the userinfo
]


@pytest.mark.parametrize("url, shown", URL_SECRETS)
def test_check_config_hides_a_secret_in_any_url(tmp_path: Path, url: str, shown: str) -> None:
    config = {"models": [{"name": "up", "backend": "litellm", "litellm_model": "openai/x", "api_base": url}]}
    if url.startswith("redis"):
        config["semantic_cache"] = {"redis_url": url}
    else:
        config["models"].append({"name": "sg", "backend": "sglang", "workers": [url]})
    result = CliRunner().invoke(cli, ["check-config", "--config", str(write(tmp_path, yaml.safe_dump(config)))])
    assert result.exit_code == 0, result.output
    assert "S3CRET" not in result.output
    printed = json.loads(result.output)
    assert printed["models"][0]["api_base"] == shown
    if url.startswith("redis"):
        assert printed["semantic_cache"]["redis_url"] == shown
    else:
        assert printed["models"][1]["workers"] == [shown]


def test_keys_are_held_as_secrets(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "admin_key: admin-S3CRET-1\napi_keys:\n  - key: client-S3CRET-1\n"
                                             "    tenant: t\n"))
    assert "S3CRET" not in repr(settings) and "S3CRET" not in str(settings.redacted())
    assert settings.resolved_admin_key() == "admin-S3CRET-1"
    assert settings.tenants_by_key() == {"client-S3CRET-1": "t"}


def test_a_variable_named_by_an_env_setting_is_only_that_secret(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # BLENDGATE_ADMIN_KEY and BLENDGATE_HOST also match the settings prefix (admin_key, host); named by a
    # *_env setting, each is only the secret it was named for.
    monkeypatch.setenv("BLENDGATE_ADMIN_KEY", "admin-key-123456")
    monkeypatch.setenv("BLENDGATE_HOST", "client-key-123456")
    config = write(tmp_path, "admin_key_env: BLENDGATE_ADMIN_KEY\napi_keys:\n  - key_env: BLENDGATE_HOST\n"
                             "    tenant: t\n")
    settings = load_settings(config)
    assert settings.admin_key is None and settings.resolved_admin_key() == "admin-key-123456"
    assert settings.host == "127.0.0.1" and settings.tenants_by_key() == {"client-key-123456": "t"}
    # Named in the environment itself, the same.
    monkeypatch.delenv("BLENDGATE_HOST")
    monkeypatch.setenv("BLENDGATE_ADMIN_KEY_ENV", "BLENDGATE_ADMIN_KEY")
    assert load_settings().resolved_admin_key() == "admin-key-123456"
    # Named by nothing, the variable still sets its field.
    monkeypatch.delenv("BLENDGATE_ADMIN_KEY_ENV")
    assert load_settings().admin_key.get_secret_value() == "admin-key-123456"


def test_the_example_admin_key_env_line_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = (REPO / "deploy" / "blendgate.example.yaml").read_text()
    assert "# admin_key_env: BLENDGATE_ADMIN_KEY\n" in example  # the line a new user uncomments
    monkeypatch.setenv("BLENDGATE_ADMIN_KEY", "admin-key-123456")
    line = "admin_key_env: BLENDGATE_ADMIN_KEY\n"
    config = write(tmp_path, example.replace(f"# {line}", line))
    assert load_settings(config).resolved_admin_key() == "admin-key-123456"


def test_every_selection_rule_field_is_a_setting(tmp_path: Path) -> None:
    """The README lists `drift_shift` under chunk_cache.selection; the settings must accept and pass it on."""
    config = tmp_path / "c.yaml"
    config.write_text("chunk_cache:\n  selection:\n    drift_shift: 0.5\n")
    assert load_settings(config).chunk_cache.selection.rule().drift_shift == 0.5


def test_operators_can_turn_the_probes_fp8_copy_on(tmp_path: Path) -> None:
    """The probe reads the model's own weights by default; `probe_weights: auto` gives it an FP8 copy of them
    where the GPU has FP8 products (and costs that copy's GPU memory)."""
    config = tmp_path / "c.yaml"
    config.write_text("chunk_cache:\n  selection:\n    probe_weights: auto\n")
    assert load_settings(config).chunk_cache.selection.rule().probe_weights == "auto"
    assert load_settings(write(tmp_path, "port: 8080\n")).chunk_cache.selection.rule().probe_weights == "model"


def test_serve_help_shows_its_defaults() -> None:
    """rich drops a help text's "[default: ...]" as markup; the defaults must still show."""
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for default in ("else 127.0.0.1", "else 8000", "else info"):
        assert default in result.output, result.output
