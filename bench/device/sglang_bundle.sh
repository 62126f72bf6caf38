#!/usr/bin/env bash
# Here (not on the device): bring SGLang 0.5.15 to the GPU machine, which has no network and takes at most
# 64 MiB a call. Downloads SGLang and the packages its server imports that the machine lacks (for CPython
# 3.12, --no-deps: the machine already has torch 2.11, triton, numpy, ...), keeps sglang-kernel's 1.7 GB
# FlashAttention-3 library apart, compressed with zstd (615 MB as a wheel, 284 MB this way), and cuts the
# lot into parts of 50 MiB in .carry/sglang/ (git-ignored). Then carry one part per device call, back to
# back, each call running bench/device/sglang_receive.sh, which installs into /tmp/site once all are in:
#   bash bench/device/sglang_bundle.sh            # a few minutes (zstd level BLENDGATE_SGLANG_ZSTD, default 6;
#                                                 # -19 packs ~10% tighter but takes ~12 min on 2 cores)
#   for each part N: run(command="bash bench/device/sglang_receive.sh", carry=[".carry/sglang/part.N"])
# Issue part 00's call alone and the rest only once it has started a machine: while none can be started, every
# call is refused and still charged 15 s of the session's device time (2026-12-02: 16 refused calls, 4 minutes).
# Add "/.carry/" to .git/info/exclude once.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/device/bundle_lib.sh
work=${BLENDGATE_SGLANG_WORK:-/tmp/blendgate-sglang}
mkdir -p "$work/wheels" .carry/sglang
# What `python -m sglang.launch_server` imports (found by importing it with each missing module added in
# turn), at SGLang 0.5.15's pins where it has them; transformers and tokenizers replace the machine's newer
# ones, which SGLang 0.5.15 refuses (a config name clash in transformers 5.17).
download_wheels "$work/wheels" sglang==0.5.15 flashinfer_python==0.6.12 apache-tvm-ffi==0.1.11 \
    transformers==5.12.1 tokenizers==0.22.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 annotated-doc==0.0.7 \
    opentelemetry-api==1.45.2 importlib_metadata==8.9.0 python-multipart==0.0.34 pydantic==2.14.3 \
    pydantic_core==2.50.4 typing-inspection==0.4.5 annotated-types==0.8.0 openai==2.6.1 jiter==0.19.0 \
    distro==1.9.0 sniffio==1.3.1 orjson==3.13.0 pybase64==1.5.1 msgspec==0.22.0 pyzmq==27.3.0 \
    setproctitle==1.3.8 partial-json-parser==0.2.1.1.post7 dill==0.4.1 compressed-tensors==0.20.0 \
    loguru==0.7.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1 ipython==9.18.1 traitlets==5.16.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
    torch_memory_saver==0.0.10 zstandard==0.25.0 gguf==0.19.0 tabulate
# What blendgate's plugin imports that the machine lacks (without them SGLang logs "Failed to load plugin
# blendgate" and serves without it; seen on the H200, 2026-11-30): its settings, the chunk-KV store, chunk keys.
download_wheels "$work/wheels" pydantic-settings==2.16.3 python-dotenv==1.2.4 cachetools==8.0.2 xxhash==4.1.0
download_wheels "$work" sglang-kernel==0.4.4
kernel=$(ls "$work"/sglang_kernel-0.4.4-*.whl)
if [ ! -f "$work/flash_ops.abi3.so.zst" ]; then
    unzip -q -o "$kernel" sgl_kernel/flash_ops.abi3.so -d "$work/fa3"
    zstd -T0 -"${BLENDGATE_SGLANG_ZSTD:-6}" --long=30 -q -f "$work/fa3/sgl_kernel/flash_ops.abi3.so" -o "$work/flash_ops.abi3.so.zst"
    rm -r "$work/fa3"
fi
cp "$kernel" "$work/wheels/" && zip -q -d "$work/wheels/$(basename "$kernel")" sgl_kernel/flash_ops.abi3.so
tar -C "$work" -cf "$work/bundle.tar" wheels flash_ops.abi3.so.zst
cut_bundle sglang "$work/bundle.tar"
