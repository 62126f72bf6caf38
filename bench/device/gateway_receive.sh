#!/usr/bin/env bash
# On the device: keep the part of the gateway bundle this call carried (.carry/gateway/part.NN with its
# manifest, see gateway_bundle.sh) in /tmp/gateway-parts; once every part is there, join, check and install the
# wheels into /tmp/site (receive_bundle.sh; then PYTHONPATH=/tmp/site; gpu_check.sh sets it). Prints "gateway
# ready" when done; safe to call again, before or after sglang_receive.sh (the packages both carry are the same
# versions).
set -euo pipefail
exec bash "$(dirname "$0")/receive_bundle.sh" gateway
