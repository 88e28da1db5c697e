"""Work on many objects at once with a progress report: ``pin`` and ``restore`` share it."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio


async def each_reporting(targets: Iterable[tuple], one: Callable[..., Awaitable[None]],
                         report: Callable[[], Awaitable[None]], every: float) -> None:
    """``one(*target)`` for every target, concurrently (``one`` bounds itself with a limiter),
    with ``report()`` every ``every`` seconds meanwhile and once more at the end, so that a
    progress bar ends where the work did."""
    async def progress() -> None:
        while True:
            await report()
            await trio.sleep(every)

    async with trio.open_nursery() as outer:
        outer.start_soon(progress)
        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(one, *target)
        outer.cancel_scope.cancel()
    await report()
