"""Configuration: YAML plus environment overrides; a broken file stops start-up naming the bad field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from blendgate.gateway.config import ConfigError, LitellmModelConfig, LocalModelConfig, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "blendgate.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_the_embedded_model() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct"]
    assert settings.models[0].path is None and settings.api_keys == []


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
        ("models:\n  - name: m\n    backend: sglang\n", "models.0.sglang.workers"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [gpu-1:30000]\n", "must be an http"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1, http://a:1/]\n", "listed twice"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1]\n    tokenizer_path: /no/such\n",
         "no such file"),
        ("models:\n  - name: m\n    backend: sglang\n    workers: [http://a:1]\n    recompute_ratio: 2\n",
         "models.0.sglang.recompute_ratio"),
        ("chunk_cache:\n  selection:\n    score: loudness\n", "chunk_cache.selection.score"),
        ("chunk_cache:\n  context_documents: 9\n", "chunk_cache.context_documents"),
        ("chunk_cache:\n  fidelity_target: 0\n", "chunk_cache.fidelity_target"),
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
    example = Path(__file__).parent.parent / "deploy" / "blendgate.example.yaml"
    settings = load_settings(example)
    assert [m.name for m in settings.models] == ["smollm2-135m-instruct"]


def test_every_selection_rule_field_is_a_setting(tmp_path: Path) -> None:
    """The README lists `drift_shift` under chunk_cache.selection; the settings must accept and pass it on."""
    config = tmp_path / "c.yaml"
    config.write_text("chunk_cache:\n  selection:\n    drift_shift: 0.5\n")
    assert load_settings(config).chunk_cache.selection.rule().drift_shift == 0.5
