#!/usr/bin/env bash
# Here: cut large files (model weights, wheels over the carry limit) into parts under 60 MiB in .carry/
# (git-ignored; add "/.carry/" to .git/info/exclude once), with a manifest of names and checksums.
# Then carry the parts one device call after another (back to back, so the machine stays warm), each call
# running bench/device/receive.sh, which joins the parts once all have arrived. Wheels in .carry/wheels
# (pip download --python-version 3.12 ...) are installed by receive.sh into /tmp/site.
#   bash bench/device/stage.sh /path/to/model.gguf
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .carry
: > .carry/manifest
for file in "$@"; do
    name=$(basename "$file")
    split -b 48M -d "$file" ".carry/$name.part"
    parts=$(ls .carry/"$name".part* | wc -l)
    echo "$name $(sha256sum "$file" | cut -d' ' -f1) $parts" >> .carry/manifest
    echo "staged $name in $parts parts:"; ls .carry/"$name".part*
done
