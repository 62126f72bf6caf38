"""`blendgate serve` processes, and CLI runs, forked from one that has imported the gateway's libraries already.

A gateway start on the CI machine (2 cores) spends most of its ~20 s of CPU importing torch, transformers,
sentence-transformers and litellm, and the suite starts about forty gateways. multiprocessing's forkserver
imports them once (`set_forkserver_preload`) and forks each gateway from there: a real, separate `blendgate serve`
process (its own PID, signals, exit code, log file, environment), minus the repeated imports; `run_cli` does the
same for `blendgate ingest`, `tune-thresholds` and the other commands. The entry point itself (`python -m
blendgate.gateway`) is still run as users run it by tests/unit/gateway/test_config.py.

Set BLENDGATE_TEST_FORK=0 to start every gateway and command with subprocess instead.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# What a gateway process imports before it serves (module names; one that fails to import is skipped by the
# forkserver, and the gateway imports it itself). Nothing here may start a thread: the forkserver forks.
PRELOAD = ["litellm", "torch", "transformers", "sentence_transformers",
           "faiss", "fastapi", "uvicorn", "blendgate.gateway.cli", "blendgate.gateway.app",
           "blendgate.gateway.lifecycle", "blendgate.gateway.server", "blendgate.gateway.rag",
           "blendgate.retriever.embedder"]

# `python -m blendgate.gateway`, as users run it: the commands' way without forking (BLENDGATE_TEST_FORK=0).
ENTRY_POINT = [sys.executable, "-m", "blendgate.gateway"]

_context: multiprocessing.context.ForkServerContext | None = None


def enabled() -> bool:
    return os.environ.get("BLENDGATE_TEST_FORK", "1") != "0" and sys.platform == "linux"


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        # The forkserver starts with this environment: litellm reads this one when imported (as the gateway
        # sets it before importing litellm, gateway/backends/upstream.py).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        # The forkserver is `python -c ...`, whose sys.path starts with the working directory, and Python 3.11's
        # forkserver imports PRELOAD before it takes this process's sys.path: started in the checkout, the
        # checkout's kernels/ would shadow transformers' `kernels` (gateway/syspath.py). So it starts in a
        # directory with nothing to import; each forked gateway still gets this process's working directory
        # and sys.path (multiprocessing's preparation data).
        here = os.getcwd()
        os.chdir(tempfile.gettempdir())
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.chdir(here)
    return _context


def _serve(argv: list[str], env: dict[str, str], log_path: str, err_path: str | None = None) -> None:
    """In the forked process: the log as stdout and stderr (or `err_path` as stderr), the gateway's
    environment, then the CLI."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if err_path else log
    os.dup2(log, 1)
    os.dup2(err, 2)
    for fd in {log, err}:
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["blendgate", *argv]
    from blendgate.gateway.cli import main

    main()


def _fork(argv: list[str], env: dict[str, str], log_path: Path, err_path: Path | None = None
          ) -> multiprocessing.Process:
    """The CLI with `argv`, forked and started (see `_serve`)."""
    process = _forkserver().Process(target=_serve, args=(argv, env, str(log_path), err_path and str(err_path)),
                                    daemon=True)
    process.start()
    return process


class ForkedProcess:
    """The parts of subprocess.Popen the tests use, over a multiprocessing.Process."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self._process = _fork(argv, env, log_path)
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("blendgate serve", timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_cli(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m blendgate.gateway ARGV` (forked as the gateways are): its exit code, stdout and stderr as
    text, as subprocess.run(..., capture_output=True, text=True) gives them. `env`: the test process's when None.
    Raises subprocess.TimeoutExpired after `timeout` seconds (the command killed)."""
    env = dict(os.environ if env is None else env)
    if not enabled():
        return subprocess.run([*ENTRY_POINT, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="blendgate-cli-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = _fork(argv, env, out, err)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["blendgate", *argv], timeout)
        return subprocess.CompletedProcess(["blendgate", *argv], process.exitcode,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))
