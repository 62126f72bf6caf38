"""A streamed request's bookkeeping ends exactly once, whether the body ran to its end or never started."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from blendgate.gateway.backends.base import ChatChunk
from blendgate.gateway.chat import StreamRelease


def test_release_stops_the_generation_and_uncounts_once_even_if_the_body_never_started() -> None:
    async def scenario() -> None:
        closed = []

        async def generation():
            try:
                yield ChatChunk(delta={"content": "a"})
                yield ChatChunk(delta={"content": "b"})
            finally:
                closed.append(True)

        in_flight: dict[str, int] = defaultdict(int, {"m": 1})
        chunks = generation()
        assert (await chunks.__anext__()).delta == {"content": "a"}  # the first chunk, read before answering
        release = StreamRelease(chunks, in_flight, "m")
        await release()  # as the response's background task, when the client left before the body started
        await release()  # and again from the body's finally: nothing more happens
        assert in_flight["m"] == 0 and closed == [True]

        replayed = StreamRelease(generation(), None, "m")  # a cached answer's replay is not counted
        await replayed()
        assert in_flight["m"] == 0

    asyncio.run(scenario())
