#!/usr/bin/env bash
# On the device, after stage.sh/receive.sh brought SmolLM2's GGUF (and .carry/ holds the NQ-open file, copied
# from ../shared/data/qa/): bench/quality.py in N shards at once (the model is small; the GPU has room), merged
# into $OUT/quality.md.   bash bench/device/quality_shards.sh N [quality.py options...]
set -euo pipefail
cd "$(dirname "$0")/../.."
shards=$1; shift
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p /tmp/quality "$OUT"
started=$(date +%s)
for i in $(seq 0 $((shards - 1))); do
    python3 bench/quality.py "$@" --shard "$i/$shards" --model /tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf \
        --cache-dir /tmp/cache --data .carry/nq-open-oracle.dev.jsonl.gz --out /tmp/quality/quality.md \
        > "/tmp/quality/shard$i.log" 2>&1 &
done
wait || true
tail -3 /tmp/quality/shard0.log
python3 bench/quality.py merge "$OUT/quality.md" /tmp/quality/quality.shard*.json
echo "took $(( $(date +%s) - started )) s"; cat "$OUT/quality.md"
