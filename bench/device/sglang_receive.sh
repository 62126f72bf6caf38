#!/usr/bin/env bash
# On the device: keep the part of the SGLang bundle this call carried (.carry/sglang/part.NN, see
# sglang_bundle.sh) in /tmp/sglang-parts; once every part is there, join, check and install into /tmp/site
# (then PYTHONPATH=/tmp/site). Prints "sglang ready" when done; safe to call again.
set -euo pipefail
cd "$(dirname "$0")/../.."
parts=/tmp/sglang-parts
mkdir -p "$parts"
[ -f .carry/sglang/manifest ] && cp .carry/sglang/manifest "$parts/"
cp .carry/sglang/part.* "$parts/" 2>/dev/null || true
if [ -f /tmp/site/.sglang-ready ]; then echo "sglang ready"; exit 0; fi
read -r digest count < "$parts/manifest" || { echo "no manifest yet: carry .carry/sglang/manifest"; exit 1; }
have=$(ls "$parts"/part.* 2>/dev/null | wc -l)
echo "have $have of $count parts"
[ "$have" -lt "$count" ] && exit 0
cat "$parts"/part.* > /tmp/sglang-bundle.tar
echo "$digest  /tmp/sglang-bundle.tar" | sha256sum -c --quiet
mkdir -p /tmp/sglang-bundle /tmp/site && tar -C /tmp/sglang-bundle -xf /tmp/sglang-bundle.tar
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/sglang-bundle/wheels/*.whl
PYTHONPATH=/tmp/site python3 - <<'PY'
import zstandard
with open("/tmp/sglang-bundle/flash_ops.abi3.so.zst", "rb") as src, \
        open("/tmp/site/sgl_kernel/flash_ops.abi3.so", "wb") as dst:
    zstandard.ZstdDecompressor(max_window_size=1 << 30).copy_stream(src, dst)
PY
rm -rf /tmp/sglang-bundle /tmp/sglang-bundle.tar "$parts"
touch /tmp/site/.sglang-ready
echo "sglang ready"
