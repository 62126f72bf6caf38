#!/usr/bin/env bash
# On the device: keep the part of the SGLang bundle this call carried (.carry/sglang/part.NN, see
# sglang_bundle.sh); once every part is there, join, check and install into /tmp/site (then
# PYTHONPATH=/tmp/site), FlashAttention-3's library decompressed into sgl_kernel last (receive_bundle.sh).
# Prints "sglang ready" when done; safe to call again.
set -euo pipefail
exec bash "$(dirname "$0")/receive_bundle.sh" sglang 'PYTHONPATH=/tmp/site python3 -c "
import zstandard
with open(\"$BUNDLE/flash_ops.abi3.so.zst\", \"rb\") as src, open(\"/tmp/site/sgl_kernel/flash_ops.abi3.so\", \"wb\") as dst:
    zstandard.ZstdDecompressor(max_window_size=1 << 30).copy_stream(src, dst)
"'
