"""A stand-in for an SGLang worker with blendgate's plugin, for CPU tests of the gateway's SGLang backend.

It speaks the part of SGLang's HTTP API the gateway uses (`POST /generate` with `input_ids`,
`sampling_params` and `stream`, answered as SSE events `data: {"text", "output_ids", "meta_info"}` with the
whole text so far, then `data: [DONE]`; `GET /health`; `GET /get_model_info`), backed by blendgate's local
engine with the embedded SmolLM2 and a chunk-cache in CPU memory. Like the plugin, it reads the chunk spans
from `sampling_params.custom_params` and reports its prefill in `meta_info["blendgate"]` (a one-element
list, as SGLang's customized_info gives it). SGLang itself does not run on a CPU; this is the contract the
real plugin is held to on the GPU.

`POST /standin/fault` sets faults for the tests: {"delay_s": seconds before the first event, "status": an
HTTP status to answer /generate with, "die_after_events": exit the process mid-stream, "unhealthy": bool,
"event": a JSON value sent as the only event instead of the answer's}.

    python tests/sglang_standin.py --port 30000 [--host 0.0.0.0] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import uvicorn
from blendgate.chunkcache.fallback import PrefillCosts
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.runner import BlendingRunner
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.engine.detokenizer import IncrementalDetokenizer, StopMatcher
from blendgate.engine.engine import LocalEngine
from blendgate.engine.errors import PromptTooLongError
from blendgate.engine.sampling import SamplingParams
from blendgate.engine.weights import load_model
from blendgate.sglang_plugin.protocol import REPORT_KEY, prompt_of
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_app(cache_dir: Path) -> FastAPI:
    loaded = load_model(None, dtype="float32", device="cpu", cache_dir=cache_dir)
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")])
    # The tests' documents are a few tokens long, which blending does not pay for: no per-chunk cost, so they
    # are blended anyway and the tests exercise blending (support.BLEND_ALWAYS).
    runner = BlendingRunner(loaded, store, costs=PrefillCosts(pass_tokens=0, placement_tokens=0))
    engine = LocalEngine(runner, max_context_tokens=loaded.max_context_tokens,
                         stop_token_ids=loaded.eos_token_ids, max_running=4, max_waiting=64)
    faults: dict = {}
    app = FastAPI()

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=503 if faults.get("unhealthy") else 200)

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": "SmolLM2-135M-Instruct (blendgate stand-in)", "is_generation": True}

    @app.post("/standin/fault")
    async def set_faults(request: Request):
        faults.clear()
        faults.update(await request.json())
        return faults

    @app.post("/generate")
    async def generate(request: Request):
        if faults.get("status"):
            return _error(faults["status"], "injected failure")
        try:
            body = await request.json()
            input_ids = body["input_ids"]
            if not isinstance(input_ids, list) or not all(isinstance(t, int) for t in input_ids):
                raise ValueError("input_ids must be a list of token ids")
            sampling = body.get("sampling_params") or {}
            prompt = prompt_of(input_ids, sampling.get("custom_params"))
            params = SamplingParams(max_new_tokens=int(sampling.get("max_new_tokens", 128)),
                                    temperature=float(sampling.get("temperature", 1.0)),
                                    top_p=float(sampling.get("top_p", 1.0)), seed=sampling.get("sampling_seed"),
                                    presence_penalty=float(sampling.get("presence_penalty", 0.0)),
                                    frequency_penalty=float(sampling.get("frequency_penalty", 0.0)))
            stops = sampling.get("stop") or []
            handle = engine.submit(prompt, params)
        except PromptTooLongError as exc:
            return _error(400, f"The input ({exc.prompt_tokens} tokens) is longer than the model's context "
                               f"length ({exc.max_context_tokens} tokens).")
        except (KeyError, ValueError, TypeError) as exc:
            return _error(400, f"invalid request: {exc}")
        rid = body.get("rid") or "standin"
        started = time.perf_counter()

        async def events():
            detokenizer = IncrementalDetokenizer(loaded.tokenizer)
            matcher = StopMatcher([stops] if isinstance(stops, str) else list(stops))
            text, output_ids, sent = "", [], 0
            try:
                if "event" in faults:
                    yield f"data: {json.dumps(faults['event'])}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if faults.get("delay_s"):
                    await asyncio.sleep(faults["delay_s"])
                async for event in handle:
                    output_ids.append(event.token_id)
                    if event.is_text:
                        text += matcher.feed(detokenizer.add(event.token_id))
                    finish = None
                    if matcher.stopped:
                        finish = {"type": "stop", "matched": "stop string"}
                    elif event.finish_reason is not None:
                        text += matcher.flush()
                        finish = {"type": "length" if event.finish_reason == "length" else "stop"}
                    meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(input_ids),
                            "completion_tokens": len(output_ids), "cached_tokens": 0,
                            "e2e_latency": time.perf_counter() - started}
                    if handle.prefill_report is not None:
                        # As SGLang's customized_info arrives: one value per forward pass that set it.
                        meta[REPORT_KEY] = [handle.prefill_report.as_dict()]
                    yield f"data: {json.dumps({'text': text, 'output_ids': output_ids, 'meta_info': meta})}\n\n"
                    sent += 1
                    if faults.get("die_after_events") and sent >= faults["die_after_events"]:
                        os._exit(1)  # a worker crashing mid-answer
                    if finish is not None:
                        break
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()

        if body.get("stream"):
            return StreamingResponse(events(), media_type="text/event-stream")
        last = None
        async for frame in events():
            if frame.startswith("data: {"):
                last = json.loads(frame[6:])
        return last

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("BLENDGATE_CACHE_DIR", "/tmp/bgcache")))
    args = parser.parse_args()
    uvicorn.run(create_app(args.cache_dir), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
