#!/usr/bin/env bash
# Here: cut large files (model weights, wheels over the carry limit) into parts of at most 48 MiB, one folder a
# part (.carry/part1, .carry/part2, ...; git-ignored), with a manifest of names and checksums in .carry/common,
# which also takes the wheels and data files named after --: carry it in every call.
# Then carry the parts one device call after another (back to back, so the machine stays warm), each call
# carrying .carry/common and one .carry/partN and running bench/device/receive.sh, which joins the parts once
# all have arrived and installs the wheels into /tmp/site.
#   bash bench/device/stage.sh /path/to/model.gguf [-- extra files for .carry/common...]
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .carry/part* .carry/common
mkdir -p .carry/common/wheels
: > .carry/common/manifest
files=(); extra=()
while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
    files+=("$1"); shift
done
for file in "${files[@]}"; do
    name=$(basename "$file")
    split -b 48M -d "$file" ".carry/$name.part"
    parts=0
    for part in .carry/"$name".part*; do
        parts=$((parts + 1)); mkdir -p ".carry/part$parts"; mv "$part" ".carry/part$parts/"
    done
    echo "$name $(sha256sum "$file" | cut -d' ' -f1) $parts" >> .carry/common/manifest
    echo "staged $name in $parts parts: .carry/part1 .. .carry/part$parts"
done
for file in "${extra[@]}"; do cp "$file" .carry/common/; done
# The project's runtime dependencies the device's Python 3.12 + torch image lacks (it has no network), as wheels
# for receive.sh to install: keep in step with pyproject.toml's dependencies.
# pydantic and pydantic-core must be a matching pair: this machine's, where it has them.
pins=$(python3 -c 'import pydantic, pydantic_core; print(f"pydantic=={pydantic.VERSION} pydantic-core=={pydantic_core.__version__}")' \
       2>/dev/null || echo "pydantic pydantic-core")
DEVICE_WHEELS=(gguf $pins pydantic-settings python-dotenv typing-extensions typing-inspection annotated-types
               cachetools xxhash)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d .carry/common/wheels "${DEVICE_WHEELS[@]}"
