"""A gateway replica's memory, for sizing deployments (README "Deploy", the Helm chart's gateway.resources):
starts `blendgate serve` with the embedded defaults (SmolLM2-135M on the CPU, all-MiniLM-L6-v2, the
in-process semantic cache), reads its resident set (VmRSS, and the peak VmHWM) from /proc once /healthz says
ready, then again after RAG chat requests with inline documents (chunk KV cached in CPU memory).

    python bench/gateway_memory.py --cache-dir /tmp/bgcache --requests 8 --out bench/results/gateway-memory-DATE.md

Linux only (/proc). The embedded model's GGUF conversion is done first if --cache-dir lacks it, and not
counted (the image bakes it in).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

KIB = 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (from /proc/<pid>/status)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def wait_ready(client: httpx.Client, process: subprocess.Popen, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with {process.returncode}")
        try:
            if client.get("/healthz").status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready within {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True, help="cache_dir (the converted model)")
    parser.add_argument("--port", type=int, default=18770)
    parser.add_argument("--requests", type=int, default=8, help="RAG chat requests before the second reading")
    parser.add_argument("--out", type=Path, help="markdown results file")
    args = parser.parse_args()

    from blendgate.engine.weights import resolve_model_folder

    resolve_model_folder(None, args.cache_dir)  # the one-time conversion, outside the measurement
    data = Path(tempfile.mkdtemp(prefix="bg-memory-"))
    env = {**os.environ, "BLENDGATE_CACHE_DIR": str(args.cache_dir), "XDG_DATA_HOME": str(data)}
    command = [sys.executable, "-m", "blendgate.gateway", "serve", "--port", str(args.port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300) as client:
            ready_s = wait_ready(client, process, 600)
            time.sleep(2)
            idle = memory_kib(process.pid)
            for i in range(args.requests):
                response = client.post("/v1/chat/completions", json={
                    "model": "smollm2-135m-instruct", "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"What do we know about topic {i}?"}],
                    "documents": [f"Topic {i} is described in document {j}. " * 20 for j in range(4)]})
                response.raise_for_status()
            served = memory_kib(process.pid)
    finally:
        process.terminate()
        process.wait(60)

    rows = [("ready, idle", idle), (f"after {args.requests} RAG requests (4 documents each)", served)]
    lines = [f"# Gateway memory, {date.today().isoformat()}", "",
             "One `blendgate serve` replica with the embedded defaults (SmolLM2-135M-Instruct float32 on the CPU,",
             "all-MiniLM-L6-v2, the in-process semantic cache, chunk KV in CPU memory).", "",
             f"- command: `python bench/gateway_memory.py {shlex.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"{platform.platform()}",
             f"- ready {ready_s:.1f} s after start (model already converted)", "",
             "| when | RSS MiB | peak RSS MiB |", "|---|---|---|"]
    lines += [f"| {when} | {m['VmRSS'] / KIB:.0f} | {m['VmHWM'] / KIB:.0f} |" for when, m in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
