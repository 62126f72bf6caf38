#!/usr/bin/env bash
# On the device machine, one call: link the packages, run the GPU tests, time the kernels, run bench/ttft.
#   bash bench/device/gpu_check.sh [tests] [kernels] [ttft ARGS...]   (default: all three, ttft with its defaults)
# Output worth keeping goes to $OUT (gpu-tests.log, kernels.md, ttft.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/bg/blendgate "${OUT:-/tmp/out}"
OUT=${OUT:-/tmp/out}
for d in gateway engine retriever chunkcache semcache kernels; do ln -sfn "$PWD/$d" "/tmp/bg/blendgate/$d"; done
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests kernels ttft)
status=0
while [ ${#steps[@]} -gt 0 ]; do
    step=${steps[0]}; steps=("${steps[@]:1}")
    case $step in
        tests) python3 -m pytest -q tests/gpu --confcutdir tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 || status=1 ;;
        kernels) python3 bench/kernels.py 2>&1 | tee "$OUT/kernels.md" | grep -v Warning || status=1 ;;
        ttft) python3 bench/ttft.py "${steps[@]}" --out "$OUT/ttft.md" 2>&1 | tee "$OUT/ttft.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
exit $status
