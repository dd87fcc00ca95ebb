"""Messages between shardchat processes: msgpack maps over Unix stream sockets.

Every message is a map with an ``op`` key. msgpack frames itself, so a
stream socket needs no length prefix: the reader feeds received bytes to an
``Unpacker`` and takes whole messages out. Writes go through one task per
link, so callers on the event loop only append to a queue.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import trio

log = logging.getLogger("shardchat.ipc")

READ_SIZE = 256 * 1024


class Link:
    """One end of a msgpack link between two processes."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.name = name
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._packer = msgpack.Packer()
        self._send, self._outbox = trio.open_memory_channel[bytes](float("inf"))
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the writer task; never blocks."""
        if self.closed:
            return
        self._send.send_nowait(self._packer.pack(message))

    async def run_writer(self) -> None:
        """Write queued messages, several at a time, until the link closes."""
        async with self._outbox:
            async for first in self._outbox:
                batch = [first]
                while True:
                    try:
                        batch.append(self._outbox.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    await self._stream.send_all(b"".join(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.info("link %s: peer gone while writing", self.name)
                    self.closed = True
                    return

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Yield received messages until the peer closes the link."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        while True:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = True
                return
            unpacker.feed(data)
            for message in unpacker:
                yield message

    async def aclose(self) -> None:
        self.closed = True
        self._send.close()
        await self._stream.aclose()
