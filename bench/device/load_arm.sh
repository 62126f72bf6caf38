#!/usr/bin/env bash
# On the device (SGLang in /tmp/site: sglang_bundle.sh / sglang_receive.sh): one arm of issue 20's load benchmark.
# Starts an SGLang HTTP server on Llama-3-8B's configuration with dummy weights, waits for it, runs bench/load.py
# against it (warm-up, then the rates), stops it. Reports and the server's log go to $OUT.
#   bash bench/device/load_arm.sh ARM DURATION_S WARMUP RATE...
# Arms:
#   stock          SGLang as shipped: radix cache on, its default chunked prefill; requests without chunk spans
#   blendgate      SGLang + blendgate's plugin at the default ratio, chunk-caches in GPU memory (40 GB tier,
#                  48 GB CPU tier behind it), radix cache on; chunked prefill off (the plugin prefills a split
#                  RAG prompt in full rather than blend it: docs/sglang-plugin.md)
#   blendgate-cpu  the same with the chunk-caches in CPU memory only (0 GB GPU tier, 64 GB CPU tier)
# Compare arms here afterwards: python bench/load_compare.py load-stock.json load-blendgate.json (bench/load.py
# writes each report's rows as JSON beside it).
# With BLENDGATE_SGLANG_PROFILE=1 in the environment the plugin times its passes (sglang_plugin/profile.py) and
# the report adds the plugin's GPU time a RAG request and its share of the run (the profile waits for each pass).
# BLENDGATE_LOAD_ARGS: more bench/load.py flags (e.g. --precompute, for every arm alike);
# BLENDGATE_LOAD_LABEL: the arm's name in the report and its files (default: ARM), to run an arm twice.
# Both give SGLang the same static memory fraction (0.55 of the GPU: weights and its KV pool), so the plugin's
# GPU tier fits beside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
arm=$1 duration=$2 warmup=$3; shift 3
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash bench/device/gpu_check.sh sglang-check
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site
model=$(python3 -c "
import sys; from pathlib import Path; sys.path.insert(0, 'bench')
from ttft import ARCHITECTURES; from sglang_rows import write_model_dir
print(write_model_dir(ARCHITECTURES['llama3-8b'], Path('/tmp/models')))")
flags=(--model-path "$model" --load-format dummy --skip-tokenizer-init --dtype bfloat16 --random-seed 0
       --mem-fraction-static 0.55 --host 127.0.0.1 --port 30000 --log-level warning)
# The CPU tier pinned at start-up for the workload's chunks (bench/load.py's --chunk-tokens default, 512);
# BLENDGATE_LOAD_PIN_TOKENS=0 to pin entries as they come, as before 2026-12-03.
pin=${BLENDGATE_LOAD_PIN_TOKENS:-512}
case $arm in
    stock) export BLENDGATE_SGLANG_PLUGIN=0; client=stock ;;
    blendgate) export BLENDGATE_SGLANG_PLUGIN=1 BLENDGATE_SGLANG_GPU_CACHE_GB=40 BLENDGATE_SGLANG_CPU_CACHE_GB=48 \
                      BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS=$pin
               flags+=(--chunked-prefill-size -1); client=blendgate ;;
    blendgate-cpu) export BLENDGATE_SGLANG_PLUGIN=1 BLENDGATE_SGLANG_GPU_CACHE_GB=0 BLENDGATE_SGLANG_CPU_CACHE_GB=64 \
                          BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS=$pin
                   flags+=(--chunked-prefill-size -1); client=blendgate ;;
    *) echo "unknown arm $arm (stock, blendgate, blendgate-cpu)"; exit 2 ;;
esac
label=${BLENDGATE_LOAD_LABEL:-$arm}
python3 -P -m sglang.launch_server "${flags[@]}" > "$OUT/server-$label.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 300); do
    curl -sf http://127.0.0.1:30000/health >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || { echo "server died"; tail -30 "$OUT/server-$label.log"; exit 1; }
    sleep 1
done
echo "server up after ${SECONDS}s"
# shellcheck disable=SC2086  # BLENDGATE_LOAD_ARGS is a list of flags
python3 bench/load.py --url http://127.0.0.1:30000 --arm "$client" --label "$label" --duration "$duration" \
    --warmup "$warmup" ${BLENDGATE_LOAD_ARGS:-} --rates "$@" --out "$OUT/load-$label.md" 2>&1 | grep -v "Warning\|warn"
grep -i "blendgate\|error\|Traceback" "$OUT/server-$label.log" | tail -15 || true
