"""A stand-in OpenAI-compatible provider on loopback, for the litellm route's tests: it answers each chat
request with the next scripted reply (well-formed or not) and records what it was sent.

It runs in the test process (uvicorn in a thread), so a test scripts it directly:

    standin.reply(json={...})                       # one non-streamed body
    standin.reply(sse=[{...}, {...}, "[DONE]"])     # one stream, frame by frame
    standin.requests[-1]                            # the JSON body the last request carried

With nothing scripted it answers a well-formed completion, `answer <n>` for the n-th request, so a test
can tell a cached answer (an old n) from a fresh one.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from support import free_port


@dataclass
class Reply:
    """One scripted answer: a JSON body (any value, or raw text), or SSE frames (dicts, strings, bytes)."""

    status: int = 200
    json: Any = None
    text: str | None = None
    sse: list[Any] | None = None


def completion(content: str | None = "ok", **choice: Any) -> dict[str, Any]:
    """A well-formed chat.completion body with one choice; `choice` adds or replaces choice fields."""
    return {"id": "chatcmpl-standin", "object": "chat.completion", "created": int(time.time()), "model": "standin",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", **choice}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **choice: Any) -> dict[str, Any]:
    """A well-formed chat.completion.chunk with one choice."""
    return {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "standin",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, **choice}]}


def stream_of(*pieces: str, finish_reason: str = "stop") -> list[Any]:
    """A well-formed stream: a role chunk, one chunk per piece, the finish, usage and [DONE]."""
    usage = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": "standin", "choices": [],
             "usage": {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}}
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in pieces),
            chunk({}, finish_reason), usage, "[DONE]"]


class OpenAIStandin:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict[str, Any]] = []
        self.script: collections.deque[Reply] = collections.deque()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "OpenAIStandin":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the stand-in provider did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def reply(self, **reply: Any) -> None:
        self.script.append(Reply(**reply))

    async def _chat(self, request: Request) -> Response:
        self.requests.append(await request.json())
        reply = self.script.popleft() if self.script else None
        if reply is None:
            body = completion(f"answer {len(self.requests)}")
            if self.requests[-1].get("stream"):
                return self._sse(stream_of(f"answer {len(self.requests)}"), 200)
            return Response(json.dumps(body), media_type="application/json")
        if reply.sse is not None:
            return self._sse(reply.sse, reply.status)
        text = reply.text if reply.text is not None else json.dumps(reply.json)
        return Response(text, status_code=reply.status, media_type="application/json")

    @staticmethod
    def _sse(frames: list[Any], status: int) -> StreamingResponse:
        def encode(frame: Any) -> bytes:
            if isinstance(frame, bytes):
                return frame
            payload = frame if isinstance(frame, str) else json.dumps(frame)
            return f"data: {payload}\n\n".encode()

        async def body():
            for frame in frames:
                yield encode(frame)

        return StreamingResponse(body(), status_code=status, media_type="text/event-stream")
