#!/usr/bin/env bash
# On the device machine, one call: link the packages, run the GPU tests, time the kernels, run bench/ttft.
#   bash bench/device/gpu_check.sh [tests] [decode-tests] [specache-tests] [gateway-e2e] [kernels]
#                                  [ttft ARGS... | profile ARGS... | decode ARGS... | specache ARGS...
#                                   | specache-quality ARGS...]
#   (default: tests kernels ttft)
# With SGLang installed in /tmp/site (sglang_bundle.sh / sglang_receive.sh), tests/gpu/test_sglang_worker.py and
# test_sglang_http.py run too, and `ttft ... --sglang` adds SGLang's rows.
# gateway-e2e: a blendgate gateway process in front of a real SGLang worker with the plugin, the openai client
# asking RAG questions (tests/gpu/test_gateway_sglang_e2e.py; log in $OUT/gateway-e2e.log). Needs both bundles
# in /tmp/site; carry each part in a call of its own, back to back (the manifests with every part):
#   bash bench/device/sglang_bundle.sh; bash bench/device/gateway_bundle.sh      # here, once
#   each SGLang part N:  run("bash bench/device/sglang_receive.sh", carry=[".carry/sglang/manifest", ".carry/sglang/part.N"])
#   gateway parts 00..02: run("bash bench/device/gateway_receive.sh", carry=[".carry/gateway/manifest", ".carry/gateway/part.N"])
#   the last one:         run("bash bench/device/gateway_receive.sh && bash bench/device/gpu_check.sh gateway-e2e",
#                             carry=[".carry/gateway/manifest", ".carry/gateway/part.03"])
# specache-quality needs SmolLM2's GGUF in /tmp/stage/files and nq-open-oracle.dev.jsonl.gz in .carry/common
# (stage.sh / receive.sh, as quality_shards.sh).
# Output worth keeping goes to $OUT (gpu-tests.log, gateway-e2e.log, kernels.md, ttft.md, decode.md, specache.md,
# specache-quality.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/bg:/tmp/site:${PYTHONPATH:-}
# python3 -P: the checkout off sys.path, or kernels/ would shadow transformers' `kernels` (gateway/syspath.py).
mkdir -p /tmp/bg/blendgate "${OUT:-/tmp/out}"
OUT=${OUT:-/tmp/out}
for d in gateway engine retriever chunkcache semcache kernels sglang_plugin web; do ln -sfn "$PWD/$d" "/tmp/bg/blendgate/$d"; done
# The plugin's entry point, as `pip install blendgate` would declare it (SGLang finds plugins by entry point).
mkdir -p /tmp/bg/blendgate-0.0.dist-info
printf 'Metadata-Version: 2.1\nName: blendgate\nVersion: 0.0\n' > /tmp/bg/blendgate-0.0.dist-info/METADATA
printf '[sglang.srt.plugins]\nblendgate = blendgate.sglang_plugin:register\n' > /tmp/bg/blendgate-0.0.dist-info/entry_points.txt
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests kernels ttft)
status=0
while [ ${#steps[@]} -gt 0 ]; do
    step=${steps[0]}; steps=("${steps[@]:1}")
    case $step in
        sglang-check) python3 -c "import sglang, sgl_kernel, flashinfer.sampling, sglang.srt.entrypoints.engine; print('sglang', sglang.__version__, 'imports')" 2>&1 | tail -5 || status=1 ;;
        tests) python3 -P -m pytest -q tests/gpu --confcutdir tests/gpu -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 || status=1 ;;
        # Without --confcutdir: the module needs tests/conftest.py's fixtures (under `tests` it skips itself).
        gateway-e2e)  # the worker's and the gateway's own logs go to $OUT too (e2e-*.log)
            missing=0
            for ready in sglang gateway; do
                [ -f /tmp/site/.$ready-ready ] || { echo "no $ready bundle in /tmp/site: run ${ready}_receive.sh"; missing=1; }
            done
            if [ $missing -eq 1 ]; then status=1; else
                python3 -P -m pytest -q tests/gpu/test_gateway_sglang_e2e.py -p no:cacheprovider -o timeout=480 2>&1 \
                    | tee "$OUT/gateway-e2e.log" | tail -25 || status=1
                cp /tmp/pytest-of-*/pytest-current/gateways*/e2e-*.log "$OUT/" 2>/dev/null || true
            fi ;;
        decode-tests) python3 -P -m pytest -q tests/gpu/test_decode.py --confcutdir tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/decode-tests.log" | tail -25 || status=1 ;;
        specache-tests) python3 -P -m pytest -q tests/gpu/test_specache_cuda.py --confcutdir tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/specache-tests.log" | tail -25 || status=1 ;;
        specache) python3 bench/specache.py "${steps[@]}" --out "$OUT/specache.md" 2>&1 | tee "$OUT/specache.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        specache-quality) BLENDGATE_QA_DATA=.carry/common python3 bench/specache.py --quality --device cuda \
            --smollm /tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf "${steps[@]}" --out "$OUT/specache-quality.md" \
            2>&1 | tee "$OUT/specache-quality.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        decode) python3 bench/decode.py "${steps[@]}" --out "$OUT/decode.md" 2>&1 | tee "$OUT/decode.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        kernels) python3 bench/kernel_times.py 2>&1 | tee "$OUT/kernels.md" | grep -v Warning || status=1 ;;
        profile) python3 bench/profile_blend.py "${steps[@]}" 2>&1 | tee "$OUT/profile.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        ttft) python3 bench/ttft.py "${steps[@]}" --out "$OUT/ttft.md" 2>&1 | tee "$OUT/ttft.log" | grep -v "Warning\|warn" || status=1; steps=() ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
exit $status
