#!/usr/bin/env bash
# On the device machine, in every call of a staged transfer (see stage.sh): keep the parts that arrived,
# join each file whose parts are all there into /tmp/stage/files, check it, install carried wheels.
set -euo pipefail
mkdir -p /tmp/stage/parts /tmp/stage/files /tmp/site
cp .carry/part*/*.part* /tmp/stage/parts/ 2>/dev/null || true
while read -r name sum parts; do
    [ -f "/tmp/stage/files/$name" ] && continue
    have=$(ls /tmp/stage/parts/"$name".part* 2>/dev/null | wc -l || true)
    if [ "$have" -lt "$parts" ]; then echo "$name: $have of $parts parts"; continue; fi
    cat /tmp/stage/parts/"$name".part* > "/tmp/stage/files/$name"
    echo "$sum  /tmp/stage/files/$name" | sha256sum -c - || { rm "/tmp/stage/files/$name"; exit 1; }
done < .carry/common/manifest
if ls .carry/common/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .carry/common/wheels/*.whl
fi
# blendgate's folders as the package they install as, without installing (the machine has no network).
mkdir -p /tmp/bg/blendgate
for d in gateway engine retriever chunkcache semcache kernels; do ln -sfn "$PWD/$d" "/tmp/bg/blendgate/$d"; done
