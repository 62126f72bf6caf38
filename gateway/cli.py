"""The `blendgate` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .config import ConfigError, Settings, load_settings

app = typer.Typer(help="blendgate: an OpenAI-compatible RAG gateway with semantic and KV caching.",
                  no_args_is_help=True, add_completion=False)

ConfigOption = typer.Option(None, "--config", "-c", help="YAML configuration file (see README).",
                            exists=False, dir_okay=False)


def _settings_or_exit(config: Optional[Path], **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        typer.echo(f"blendgate: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Third-party chatter that says nothing an operator needs.
    for noisy in ("LiteLLM", "litellm", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def serve(
    config: Optional[Path] = ConfigOption,
    host: Optional[str] = typer.Option(None, help="Address to listen on [default: 127.0.0.1]."),
    port: Optional[int] = typer.Option(None, help="Port to listen on [default: 8000]."),
    log_level: Optional[str] = typer.Option(None, help="debug, info, warning or error [default: info]."),
) -> None:
    """Run the gateway. With no configuration it serves the embedded SmolLM2-135M-Instruct on the CPU."""
    settings = _settings_or_exit(config, host=host, port=port, log_level=log_level)
    _configure_logging(settings.log_level)
    import uvicorn

    from .app import create_app

    logging.getLogger("blendgate.gateway").info(
        "blendgate %s on http://%s:%d serving %s", __version__, settings.host, settings.port,
        ", ".join(m.name for m in settings.models))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, timeout_graceful_shutdown=5)


@app.command("check-config")
def check_config(config: Optional[Path] = ConfigOption) -> None:
    """Validate a configuration and print it as the gateway would use it (API keys hidden)."""
    settings = _settings_or_exit(config)
    data = json.loads(settings.model_dump_json())
    for entry in data.get("api_keys", []):
        if entry.get("key"):
            entry["key"] = "***"
    typer.echo(json.dumps(data, indent=2))


@app.command()
def version() -> None:
    """Print blendgate's version."""
    typer.echo(__version__)


def main() -> None:
    app()
