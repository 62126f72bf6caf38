"""README.md's figures for the retrieval and chunk-cache settings are the settings models' defaults.

The README gives a setting's default as a figure in parentheses right after its name: "`ivf_nprobe` (256)",
"`gpu_bytes` (4 GiB)", "`probe_layers` (all)", "`chunk_prefix` (`system`, the default, or `none`)",
"`retrieval.max_file_bytes` (50 MiB)", "`recompute_ratio` (default 0.15)". This test reads every such figure in
the README's "Documents and RAG" and "Chunk-caches and blending" sections and compares it with the default of
the setting of that name (the shared tier's under `chunk_cache.redis` too), so the two cannot drift apart again;
deploy/blendgate.example.yaml, which spells out those sections with their defaults, is checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from blendgate.gateway.config import (
    ChunkCacheRedisSettings,
    ChunkCacheSettings,
    ModelRagConfig,
    RetrievalSettings,
    SelectionSettings,
    default_data_dir,
)
from pydantic import BaseModel
from support import REPO

README = REPO / "README.md"
SECTIONS = ("## Documents and RAG", "## Chunk-caches and blending")
# Settings models by the prefix a README name may carry; a bare name is looked up in this order.
MODELS: dict[str, type[BaseModel]] = {"retrieval": RetrievalSettings, "chunk_cache": ChunkCacheSettings,
                                      "selection": SelectionSettings, "rag": ModelRagConfig,
                                      "redis": ChunkCacheRedisSettings}
# Every one of these must be quoted with its default (a figure dropped from the README fails too).
REQUIRED = {"chunk_tokens", "chunk_overlap_tokens", "approximate_index_threshold", "ivf_nprobe", "max_file_bytes",
            "data_dir", "recompute_ratio", "fidelity_target", "chunk_prefix", "context_documents", "chunk_context",
            "gpu_bytes", "cpu_bytes", "disk_bytes", "score", "layer", "probe_layers", "probe_stride", "probe_weights",
            "sink_tokens", "gradual", "chunk_budget", "drift_shift", "top_k", "url", "budget_bytes", "key_prefix",
            "timeout_s", "retry_s", "write_queue_bytes", "adapt"}
# `name` (figure ...: the figure is a `word`, a number with thousands commas, or runs to the first comma,
# semicolon, colon or closing parenthesis.
FIGURE = re.compile(r"`(?:(retrieval|chunk_cache|selection|rag|redis)\.)?([a-z_]+)`\s\((?:default\s+)?"
                    r"(`[^`]*`|\d{1,3}(?:,\d{3})+(?:\.\d+)?|[^,;:)]+)")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def prose(text: str) -> str:
    """The README sections checked, without code blocks (whose YAML holds examples, not defaults)."""
    parts = []
    for heading in SECTIONS:
        start = text.index(heading + "\n")
        end = text.find("\n## ", start + len(heading))
        parts.append(text[start:end if end >= 0 else len(text)])
    return re.sub(r"```.*?```", "", "\n".join(parts), flags=re.DOTALL)


def setting(prefix: str | None, name: str) -> tuple[type[BaseModel], str] | None:
    for model in ([MODELS[prefix]] if prefix else MODELS.values()):
        if name in model.model_fields:
            return model, name
    return None


def parse(figure: str) -> object:
    """A README figure as a value: a number (1, 0.15, 20,000), a size (4 GiB), none/all (None), `true`/`false`,
    a `word`."""
    figure = " ".join(figure.split())
    if figure in ("`true`", "`false`"):
        return figure == "`true`"
    if figure.startswith("`"):
        return figure.strip("`")
    if figure in ("none", "all"):
        return None
    size = re.fullmatch(r"([\d.]+) (KiB|MiB|GiB)", figure)
    if size:
        return int(float(size.group(1)) * UNITS[size.group(2)])
    if re.fullmatch(r"[\d,]+(\.\d+)?", figure):
        return float(figure.replace(",", ""))
    raise AssertionError(f"README figure {figure!r} is not a default the test understands")


def quoted_defaults() -> list[tuple[type[BaseModel], str, str]]:
    found = []
    for prefix, name, figure in FIGURE.findall(prose(README.read_text())):
        target = setting(prefix or None, name)
        if target is not None and not isinstance(target[0].model_fields[name].get_default(call_default_factory=True),
                                                 BaseModel):
            found.append((*target, figure))
    return found


def test_every_required_setting_is_quoted_with_a_figure() -> None:
    assert REQUIRED - {name for _, name, _ in quoted_defaults()} == set()


@pytest.mark.parametrize(("model", "name", "figure"), quoted_defaults(),
                         ids=lambda value: value if isinstance(value, str) else getattr(value, "__name__", ""))
def test_the_readme_figure_is_the_default(model: type[BaseModel], name: str, figure: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)  # the README gives the default without it
    default = model.model_fields[name].get_default(call_default_factory=True)
    quoted = parse(figure)
    if name == "data_dir":
        assert Path(str(quoted)).expanduser() == default_data_dir() == default
    elif isinstance(quoted, float):
        assert quoted == pytest.approx(default), f"README says {name} defaults to {figure}, the code {default}"
    else:
        assert quoted == default, f"README says {name} defaults to {figure}, the code {default}"


def test_the_example_config_sets_the_retrieval_and_chunk_cache_defaults() -> None:
    """deploy/blendgate.example.yaml spells out these sections with their defaults: they must be the defaults."""
    from blendgate.gateway.config import load_settings

    example = load_settings(README.parent / "deploy" / "blendgate.example.yaml")
    assert example.retrieval == RetrievalSettings()
    assert example.chunk_cache == ChunkCacheSettings()
