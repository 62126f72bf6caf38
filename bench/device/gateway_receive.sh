#!/usr/bin/env bash
# On the device: keep the part of the gateway bundle this call carried (.carry/gateway/part.NN with its
# manifest, see gateway_bundle.sh) in /tmp/gateway-parts; once every part is there, join, check and install the
# wheels into /tmp/site (then PYTHONPATH=/tmp/site; gpu_check.sh sets it). Prints "gateway ready" when done;
# safe to call again, before or after sglang_receive.sh (the packages both carry are the same versions).
set -euo pipefail
cd "$(dirname "$0")/../.."
parts=/tmp/gateway-parts
mkdir -p "$parts"
[ -f .carry/gateway/manifest ] && cp .carry/gateway/manifest "$parts/"
cp .carry/gateway/part.* "$parts/" 2>/dev/null || true
if [ -f /tmp/site/.gateway-ready ]; then echo "gateway ready"; exit 0; fi
read -r digest count < "$parts/manifest" || { echo "no manifest yet: carry .carry/gateway/manifest"; exit 1; }
have=$(ls "$parts"/part.* 2>/dev/null | wc -l)
echo "have $have of $count parts"
[ "$have" -lt "$count" ] && exit 0
cat "$parts"/part.* > /tmp/gateway-bundle.tar
echo "$digest  /tmp/gateway-bundle.tar" | sha256sum -c --quiet
mkdir -p /tmp/gateway-bundle /tmp/site && tar -C /tmp/gateway-bundle -xf /tmp/gateway-bundle.tar
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/gateway-bundle/wheels/*.whl
rm -rf /tmp/gateway-bundle /tmp/gateway-bundle.tar "$parts"
touch /tmp/site/.gateway-ready
echo "gateway ready"
