#!/usr/bin/env bash
# On the device machine: bench/fetch_ttft.py (issue 21's TTFT over throttled links) with a redis-server and the
# redis client carried in .carry/redis, SmolLM2's GGUF staged (stage.sh / receive.sh) and NQ-open in
# .carry/common. Prepare .carry/redis here once (the machine has no redis-server and no network):
#   mkdir -p .carry/redis && cp /usr/bin/redis-server .carry/redis/ \
#     && cp -L /lib/x86_64-linux-gnu/{liblzf.so.1,libjemalloc.so.2} .carry/redis/ \
#     && pip download --no-deps --only-binary=:all: --python-version 3.12 -d .carry/redis redis==8.1.0
#   run("bash bench/device/fetch_ttft.sh --rates 1 10 100 --codecs raw:0 int8:0 cachegen:0 cachegen:1 --prompts 4",
#       carry=[".carry/common", ".carry/redis"])   # after the SmolLM2 parts, in the same machine session
# FETCH_SECONDS (default 300) bounds the run; the table goes to $OUT/fetch-ttft.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/redisbin && cp .carry/redis/redis-server /tmp/redisbin/ && chmod +x /tmp/redisbin/redis-server
export LD_LIBRARY_PATH=$PWD/.carry/redis:${LD_LIBRARY_PATH:-} PATH=/tmp/redisbin:$PATH
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/redis/*.whl
redis-server --version || exit 1
bash bench/device/receive.sh | tail -1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout "${FETCH_SECONDS:-300}" python3 bench/fetch_ttft.py --model /tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf \
    --data .carry/common/nq-open-oracle.dev.jsonl.gz --cache-dir /tmp/cache "$@" --out "$OUT/fetch-ttft.md" 2>&1 \
    | grep -v "Warning\|warn" | tail -40
