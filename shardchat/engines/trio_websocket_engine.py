"""The comparison engine: the Connection interface over trio-websocket 0.12.2.

trio-websocket runs a reader task per connection, passes each message through a
memory channel and takes a lock for every write, which is why it costs more CPU
per message than wsproto_engine. It is kept so the two can be compared with the
same chat code. send() must not block here either, so it appends to a queue that
a writer task drains with send_message(), under the same send_buffer_limit.

This module guards against three behaviours of trio-websocket 0.12.2:

- Its server feeds bytes that arrive before the upgrade is accepted to wsproto's
  handshake parser, which drops them. _PrefixedStream therefore withholds every
  byte after the request head until the 101 response has been sent.
- It sends a pong for a ping that arrives while its close frame is in flight,
  and wsproto raises LocalProtocolError in its reader task, which would cancel
  the handler. The reader runs in a nursery of its own that absorbs that error.
- After an abnormal close it leaves the stream open, so this module closes the
  socket itself.

Three differences from wsproto_engine remain. On an invalid frame (close codes
PROTOCOL_ERROR and INVALID_DATA) trio-websocket closes the TCP connection without
sending a close frame. A cancelled connection is closed without one too, because
trio-websocket cannot send without awaiting. And max_message_size counts the
characters of a text message, because trio-websocket measures messages with len().
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from shardchat.close_codes import CloseCode
from shardchat.engines import (
    as_close_code,
    parse_request_head,
    read_request_head,
    reject,
    select_subprotocol_or_reject,
    start_server_handshake,
    utf8_size,
)
from shardchat.exceptions import ConnectionClosed, HandshakeError
from shardchat.websocket import HandshakeRequest

__all__ = ["TrioWebsocketConnection", "accept"]

_log = logging.getLogger("shardchat.websocket")

RECEIVE_BUFFER_SIZE = 64 * 1024

# SO_LINGER on with a zero timeout: close() resets the connection and drops the
# unsent backlog instead of keeping it in the kernel.
_LINGER_RESET = struct.pack("ii", 1, 0)

_SEND_BUFFER_FULL = "send buffer full"


class _PrefixedStream(trio.abc.Stream):
    """A socket stream that returns the request head first.

    Bytes after the head, read early or not, are returned only once ``accepted``
    is set, so trio-websocket feeds them to the open connection.
    """

    def __init__(self, stream: trio.SocketStream, head: bytes, early_data: bytes):
        self.socket_stream = stream
        self.accepted = trio.Event()
        self._head = head
        self._early_data = early_data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            self._head, data = _split(self._head, max_bytes)
            await trio.lowlevel.checkpoint()
            return data
        await self.accepted.wait()
        if self._early_data:
            self._early_data, data = _split(self._early_data, max_bytes)
            return data
        return await self.socket_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.socket_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.socket_stream.aclose()


def _split(data: bytes, max_bytes: int | None) -> tuple[bytes, bytes]:
    """Return the rest of data and its first max_bytes bytes, in that order."""
    if max_bytes is None or len(data) <= max_bytes:
        return b"", data
    return data[max_bytes:], data[:max_bytes]


class TrioWebsocketConnection:
    """A server connection over a trio-websocket WebSocketConnection."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        trio_socket: trio.socket.SocketType,
        *,
        request: HandshakeRequest,
        subprotocol: str | None,
        remote_address: str,
        close_timeout: float,
        send_buffer_limit: int,
    ) -> None:
        self.remote_address = remote_address
        self.request = request
        self.subprotocol = subprotocol
        self._ws = ws
        self._socket = trio_socket
        self._close_timeout = close_timeout
        self._send_buffer_limit = send_buffer_limit

        # Messages waiting for the writer task, with their UTF-8 sizes. The
        # first one stays queued until send_message() has returned.
        self._queue: deque[tuple[str, int]] = deque()
        self._queued_bytes = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._drained_lot = trio.lowlevel.ParkingLot()

        # trio-websocket reports a close we started as NORMAL whatever code we
        # sent, so the code and reason we sent are kept here.
        self._local_close: tuple[int, str] | None = None
        self._abort_close: tuple[int, str] | None = None
        self._close_started = False
        self._close_done = trio.Event()
        self._close_scope: trio.CancelScope | None = None

    @property
    def closed(self) -> bool:
        return (
            self._ws.closed is not None
            or self._local_close is not None
            or self._abort_close is not None
        )

    async def receive(self) -> str | bytes:
        if self._abort_close is not None:
            raise ConnectionClosed(*self._abort_close)
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed:
            raise self._closed_error() from None

    def send(self, text: str) -> None:
        if self.closed:
            raise self._closed_error()
        size = utf8_size(text)
        self._queue.append((text, size))
        self._queued_bytes += size
        if self._queued_bytes > self._send_buffer_limit:
            self._abort_slow_reader()
            raise self._closed_error()
        if self._writer_lot:
            self._writer_lot.unpark()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._close_started:
            with trio.move_on_after(self._close_timeout):
                await self._close_done.wait()
            return
        self._close_started = True
        if not self.closed:
            self._local_close = (code, reason)
        try:
            with trio.move_on_after(self._close_timeout) as self._close_scope:
                # Messages queued before the close go out before the close frame.
                await self._drain()
                await self._ws.aclose(code, reason or None)
        finally:
            self.close_now()

    def close_now(self) -> None:
        """Close the socket without a close handshake.

        Used on cancellation too, where trio-websocket can send nothing because
        sending awaits.
        """
        self._queue.clear()
        self._queued_bytes = 0
        self._socket.close()
        self._close_done.set()
        self._drained_lot.unpark_all()

    def stop_close_handshake(self) -> None:
        """End a close handshake whose reader task has crashed."""
        if self._close_scope is not None:
            self._close_scope.cancel()
        self.close_now()

    async def run_writer(self) -> None:
        """Send queued messages one at a time until the connection closes."""
        while self._abort_close is None:
            if not self._queue:
                self._drained_lot.unpark_all()
                await self._writer_lot.park()
                continue
            text, size = self._queue[0]
            try:
                await self._ws.send_message(text)
            except trio_websocket.ConnectionClosed:
                self._queue.clear()
                self._queued_bytes = 0
                self._drained_lot.unpark_all()
                return
            if self._queue:
                self._queue.popleft()
                self._queued_bytes -= size

    async def _drain(self) -> None:
        while self._queue and self._ws.closed is None:
            await self._drained_lot.park()

    def _closed_error(self) -> ConnectionClosed:
        if self._abort_close is not None:
            return ConnectionClosed(*self._abort_close)
        if self._local_close is not None:
            return ConnectionClosed(*self._local_close)
        reason = self._ws.closed
        if reason is None:
            return ConnectionClosed(CloseCode.ABNORMAL, "")
        return ConnectionClosed(as_close_code(reason.code), reason.reason or "")

    def _abort_slow_reader(self) -> None:
        _log.info(
            "aborted connection from %s: %d bytes waiting to be sent exceed "
            "the send buffer limit of %d bytes",
            self.remote_address,
            self._queued_bytes,
            self._send_buffer_limit,
        )
        self._abort_close = (CloseCode.POLICY_VIOLATION, _SEND_BUFFER_FULL)
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.close_now()


class _ReaderHost:
    """The task that owns the nursery of trio-websocket's reader task.

    A LocalProtocolError from the reader ends this task instead of the
    connection's nursery, and ends the close handshake it interrupted.
    """

    def __init__(self) -> None:
        self.connection: TrioWebsocketConnection | None = None

    async def run(
        self, *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await trio.sleep_forever()
        except* LocalProtocolError:
            # trio-websocket 0.12.2 sends a pong for a ping that crossed our
            # close frame, and wsproto allows no frame after a close.
            if self.connection is not None:
                _log.debug(
                    "trio-websocket reader failed while closing connection from %s",
                    self.connection.remote_address,
                )
                self.connection.stop_close_handshake()


@asynccontextmanager
async def accept(
    sock: socket.socket,
    initial_data: bytes,
    *,
    remote_address: str,
    select_subprotocol: Callable[[HandshakeRequest], str | None],
    handshake_timeout: float,
    close_timeout: float,
    max_message_size: int,
    send_buffer_limit: int,
    nursery: trio.Nursery | None = None,
) -> AsyncIterator[TrioWebsocketConnection]:
    """Complete the server handshake with trio-websocket and yield the connection.

    ``nursery`` is accepted for interface parity and not used: trio-websocket
    needs a nursery of each connection's own for its reader task.

    Raises:
        HandshakeError: the request was rejected, after the response was sent.
    """
    sock.setblocking(False)
    deadline = trio.current_time() + handshake_timeout
    timeout_error = HandshakeError(
        408, f"handshake timed out after {handshake_timeout} s"
    )
    head = None
    with trio.move_on_at(deadline):
        try:
            head, early_data = await read_request_head(sock, initial_data)
            request = parse_request_head(head)
        except HandshakeError as error:
            reject(sock, remote_address, error)
            raise
    if head is None:
        reject(sock, remote_address, timeout_error)
        raise timeout_error
    # trio-websocket would reject an invalid request itself and then wait
    # forever for a valid one, so the request is checked before it is parsed.
    start_server_handshake(sock, remote_address, head)

    trio_socket = trio.socket.from_stdlib_socket(sock)
    stream = _PrefixedStream(trio.SocketStream(trio_socket), head, early_data)
    reader_host = _ReaderHost()
    rejection: HandshakeError | None = None
    async with trio.open_nursery() as nursery:
        reader_nursery = await nursery.start(reader_host.run)
        connection = None
        try:
            with trio.move_on_at(deadline):
                ws_request = await trio_websocket.wrap_server_stream(
                    reader_nursery,
                    stream,
                    max_message_size=max_message_size,
                    receive_buffer_size=RECEIVE_BUFFER_SIZE,
                )
                subprotocol = select_subprotocol_or_reject(
                    sock, remote_address, request, select_subprotocol
                )
                ws = await ws_request.accept(subprotocol=subprotocol)
                stream.accepted.set()
                connection = TrioWebsocketConnection(
                    ws,
                    trio_socket,
                    request=request,
                    subprotocol=subprotocol,
                    remote_address=remote_address,
                    close_timeout=close_timeout,
                    send_buffer_limit=send_buffer_limit,
                )
            if connection is None:
                reject(sock, remote_address, timeout_error)
                rejection = timeout_error
        except HandshakeError as error:
            rejection = error

        if connection is None:
            # Raised after the nursery, which would wrap it in a group.
            nursery.cancel_scope.cancel()
        else:
            reader_host.connection = connection
            nursery.start_soon(connection.run_writer)
            try:
                yield connection
                await connection.close()
            finally:
                connection.close_now()
                nursery.cancel_scope.cancel()
    if rejection is not None:
        raise rejection
