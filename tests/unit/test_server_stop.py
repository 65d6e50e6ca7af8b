"""The server's background loops end when it stops, even one whose cancellation is lost."""

from __future__ import annotations

import asyncio

from icegate_server.server import cancel_until_done


def test_a_loop_that_loses_its_cancellation_still_ends() -> None:
    rounds = []

    async def stubborn() -> None:
        # What the TURN sweeper did when its store call turned the cancellation into an
        # error it retries on: sleep, and go on.
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if "cancellation lost" in rounds:
                    raise
                rounds.append("cancellation lost")

    async def main() -> None:
        tasks = [asyncio.create_task(stubborn()), asyncio.create_task(asyncio.sleep(3600))]
        await asyncio.sleep(0.02)
        await asyncio.wait_for(cancel_until_done(tasks), timeout=5)
        assert all(task.done() for task in tasks)

    asyncio.run(main())
    assert rounds == ["cancellation lost"]
