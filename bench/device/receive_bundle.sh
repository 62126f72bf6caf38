#!/usr/bin/env bash
# On the device: one part of a bundle (sglang_bundle.sh, gateway_bundle.sh) per call. Keeps the part this call
# carried (.carry/NAME/part.NN, and .carry/NAME/manifest: "sha256 parts") in /tmp/NAME-parts; once every part is
# there, joins them, checks the digest, unpacks, installs the bundle's wheels into /tmp/site (then
# PYTHONPATH=/tmp/site), runs the bundle's own last step if given, and marks /tmp/site/.NAME-ready.
# Prints "NAME ready" when done; safe to call again.
#   bash bench/device/receive_bundle.sh NAME [LAST_STEP]   # LAST_STEP: a command run with $BUNDLE the unpacked dir
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1 last_step=${2:-}
parts=/tmp/$name-parts
mkdir -p "$parts"
[ -f ".carry/$name/manifest" ] && cp ".carry/$name/manifest" "$parts/"
cp ".carry/$name"/part.* "$parts/" 2>/dev/null || true
if [ -f "/tmp/site/.$name-ready" ]; then echo "$name ready"; exit 0; fi
read -r digest count < "$parts/manifest" || { echo "no manifest yet: carry .carry/$name/manifest"; exit 1; }
have=$(ls "$parts"/part.* 2>/dev/null | wc -l)
echo "have $have of $count parts"
[ "$have" -lt "$count" ] && exit 0
export BUNDLE=/tmp/$name-bundle
cat "$parts"/part.* > "$BUNDLE.tar"
echo "$digest  $BUNDLE.tar" | sha256sum -c --quiet
mkdir -p "$BUNDLE" /tmp/site && tar -C "$BUNDLE" -xf "$BUNDLE.tar"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$BUNDLE"/wheels/*.whl
[ -z "$last_step" ] || bash -c "$last_step"
rm -rf "$BUNDLE" "$BUNDLE.tar" "$parts"
touch "/tmp/site/.$name-ready"
echo "$name ready"
