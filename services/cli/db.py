"""A CLI verb's read of the database: one connection as tuneline_app, closed after."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


def read_db(main, read: Callable[[Any], Awaitable[Any]]) -> Any:
    """`read(conn)` on a connection to the stack's database; an unreachable server is a StackUnreachable."""
    async def go():
        conn = await main._db(main.urls()[1])
        try:
            return await read(conn)
        finally:
            await conn.close()

    return asyncio.run(go())
