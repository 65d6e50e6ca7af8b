"""A TCP proxy on loopback that delays every byte by a fixed time, each way, keeping order.

Put in front of a real Redis, it turns each store round trip into one of at least twice the
delay: what a store in another zone, or a congested link, does to a call's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class DelayProxy:
    """Listens on 127.0.0.1 (port 0) and forwards to `target_port`, `delay` seconds late."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.delay = delay
        self._target_port = target_port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy",
                                        daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(5)
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """A Redis URL for the proxied server."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Timers with the same delay fire in the order they were set: the byte order holds.
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                loop.call_later(self.delay, _write, writer, data)
        finally:
            loop.call_later(self.delay, writer.close)

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in self._writers:
                writer.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)
