"""Start-up as a load balancer sees it: the port opens at once and /healthz answers 503 "loading" until the
models, the collections and the semantic cache are ready."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from support import GatewayProcess


def test_healthz_answers_loading_from_the_moment_the_port_opens(workdir: Path, model_cache_dir: Path,
                                                                tmp_path: Path) -> None:
    config = {"retrieval": {"data_dir": str(tmp_path / "collections")}, "semantic_cache": {"enabled": True}}
    process = GatewayProcess("early-port", config, workdir, model_cache_dir).launch()
    answers: list[tuple[int, str]] = []
    first: dict = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not answers or answers[-1][0] != 200):
            assert process.process is not None and process.process.poll() is None, process.log()
            try:
                health = httpx.get(f"{process.url}/healthz", timeout=5)
            except httpx.TransportError:  # the port is not open yet
                time.sleep(0.02)
                continue
            answers.append((health.status_code, health.json()["status"]))
            first = first or health.json()
            time.sleep(0.05)
    finally:
        process.stop()
    assert answers, f"the port never opened:\n{process.log()}"
    # The first answer comes while loading; every answer before "ready" says "loading".
    assert answers[0] == (503, "loading"), answers[:5]
    # The port opened before the collections and the semantic cache were open, not after.
    assert first["retrieval"]["state"] == "loading" and first["semantic_cache"]["state"] == "loading", first
    assert answers[-1] == (200, "ready"), process.log()
    assert set(answers[:-1]) == {(503, "loading")}, sorted(set(answers))


def test_collections_that_cannot_be_opened_stop_the_gateway_with_exit_code_1(workdir: Path, model_cache_dir: Path,
                                                                             tmp_path: Path) -> None:
    data = tmp_path / "collections"
    data.mkdir()
    (data / "chunks.sqlite3").write_bytes(b"not a database" * 100)
    config = {"models": [{"name": "m", "backend": "litellm", "litellm_model": "openai/x",
                          "api_base": "http://127.0.0.1:9/v1"}], "retrieval": {"data_dir": str(data)}}
    process = GatewayProcess("unopenable", config, workdir, model_cache_dir).launch()
    assert process.process is not None
    try:
        assert process.process.wait(timeout=240) == 1, process.log()
    finally:
        process.stop()
    assert "cannot open the document collections" in process.log()
