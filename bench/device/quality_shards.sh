#!/usr/bin/env bash
# On the device, after stage.sh/receive.sh brought SmolLM2's GGUF (and .carry/common holds the question sets,
# copied from ../shared/data/qa/): bench/quality.py in N shards at once (the model is small; the GPU has room),
# merged into $OUT/quality-NAME.md, with the shards' per-question records in $OUT/quality-NAME.tar.gz (merge
# them here with `python bench/quality.py merge OUT.md SHARD.json...`). QUALITY_SECONDS, when set, stops the
# shards after that long; the questions they finished are merged (the same questions for every variant).
#   bash bench/device/quality_shards.sh NAME N [quality.py options...]
# QUALITY_SCRIPT=bench/quality_oracle.py (with ORACLE=attention|deviation) runs the oracle diagnostic instead.
set -uo pipefail
cd "$(dirname "$0")/../.."
name=$1; shards=$2; shift 2
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site:${PYTHONPATH:-} BLENDGATE_QA_DATA=.carry/common
# The machine's cores shared out between the shards: each PyTorch process otherwise starts a thread per core for
# its host-side work (the codec variants' round trips), 16 shards x 16 threads on 16 cores, and the H200 run of
# 2026-12-01 finished 16 questions of the codec variants in 393 s.
threads=$(( $(nproc) / shards )); [ "$threads" -lt 1 ] && threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$threads}
OUT=${OUT:-/tmp/out}; work=/tmp/quality/$name; mkdir -p "$work" "$OUT"
started=$(date +%s)
for i in $(seq 0 $((shards - 1))); do
    timeout "${QUALITY_SECONDS:-36000}" python3 "${QUALITY_SCRIPT:-bench/quality.py}" "$@" --shard "$i/$shards" \
        --model /tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf --cache-dir /tmp/cache \
        --out "$work/quality.md" > "$work/shard$i.log" 2>&1 &
done
wait
tail -2 "$work/shard0.log"
python3 bench/quality.py merge "$OUT/quality-$name.md" "$work"/quality.shard*.json
tar -czf "$OUT/quality-$name.tar.gz" -C "$work" $(cd "$work" && ls quality.shard*.json)
echo "$name took $(( $(date +%s) - started )) s"
