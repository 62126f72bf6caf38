"""Work for a client that has gone is stopped. A streamed answer notices when it next writes; a non-streamed
one is generated whole before anything is written, so without a watch on the connection a client that gave
up would leave its generation running to the end (tens of seconds of engine time)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.types import Receive

Result = TypeVar("Result")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready; the work behind it was cancelled."""


async def _disconnected(receive: Receive) -> None:
    """Returns once the server reports that the client disconnected (the request body is already read, so
    every other message is an empty keep-alive read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[Result]) -> Result:
    """`work`'s result, or, when the client disconnects first, `work` cancelled (its generation stops and
    frees its engine slot and KV cache; an upstream call is closed) and ClientDisconnected raised.

    `receive` is the request's ASGI receive channel, after its body was read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled ourselves (shutdown): so is the work
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its cleanup runs before the answer goes
        raise ClientDisconnected()
    return task.result()
