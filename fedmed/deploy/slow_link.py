"""A hospital's slow link, rehearsed on one machine: a TCP relay on 127.0.0.1 that passes a site's connections on
to the coordinator's proxy at a fixed rate in each direction, shared by all of the site's connections.

TLS goes through untouched (the relay sees only bytes), so the site's certificate, the proxy's checks and
Flower's messages are the real ones; only the pace changes. The deployment tests and benchmarks use it to
send a site's upload through a link of a few MB/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from .ports import free_port

CHUNK = 16 * 1024  # paced in pieces this size: a smooth rate, not bursts


class _Pace:
    """`rate` bytes per second, in arrival order, across every connection that shares it."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.held = False
        self._free_at = 0.0

    async def take(self, count: int) -> None:
        while self.held:
            await asyncio.sleep(0.05)
        if self.rate is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._free_at = max(now, self._free_at) + count / self.rate
        await asyncio.sleep(self._free_at - now)


class SlowLink:
    """Listens on 127.0.0.1:`port` and relays to `target` (host, port): at most `upload_rate` bytes/s towards the
    target and `download_rate` back (None: unlimited). A context manager; `close` stops it and every connection."""

    def __init__(self, target: tuple[str, int], *, upload_rate: float | None, download_rate: float | None) -> None:
        self.target = target
        self.port = free_port()
        self.uploaded = 0  # bytes passed towards the target
        self._up, self._down = _Pace(upload_rate), _Pace(download_rate)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"slow-link-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SlowLink:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise OSError(f"the slow link could not listen on {self.address}")
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def hold(self) -> None:
        """Pass nothing more towards the target until `release`: a link gone silent mid-upload."""
        self._up.held = True

    def release(self) -> None:
        self._up.held = False

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _relay(self, site_reader: asyncio.StreamReader, site_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            site_writer.close()
            return
        await asyncio.gather(
            self._pipe(site_reader, target_writer, self._up, upload=True),
            self._pipe(target_reader, site_writer, self._down, upload=False),
            return_exceptions=True,
        )
        for writer in (site_writer, target_writer):
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pace: _Pace, *, upload: bool
    ) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                await pace.take(len(chunk))
                writer.write(chunk)
                await writer.drain()
                if upload:
                    self.uploaded += len(chunk)
        finally:  # the other direction may still be sending: half-close only
            with contextlib.suppress(Exception):
                writer.write_eof()
